"""The embedded digits demo: the shipped bundle, its nodes, the example workflow and the README's
first command (``demo/run_demo.py``) run end to end against a real ComfyUI server.

Golden values (``tests/digits_golden.json``) come from the shipped bundle on the pinned ComfyUI;
``SDN_REGENERATE_GOLDEN=1`` rewrites them (only after retraining the bundle).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.locate import REPO_ROOT, RUNTIME_DIR, pack_file
from harness.prompts import PromptBuilder
from harness.sets import write_digit_images
from harness.workflow import EXAMPLE_WORKFLOWS_DIR, check_ui_workflow, load_ui_workflow, nodes_of_type, ui_to_api

digits = pack_file("demo/digits.py", "sdn_demo_digits")
WORKFLOW = EXAMPLE_WORKFLOWS_DIR / "digits_demo.json"
GOLDEN = Path(__file__).resolve().parent / "digits_golden.json"
DEFAULT_GUIDANCE = {"mode": "calibrated", "strength": 1.0, "bandwidth": 1.0, "start_percent": 0.0, "end_percent": 1.0,
                    "beta_threshold": 0.0}


# -- the bundle ---------------------------------------------------------------------------------

def test_bundle_is_small_hashed_and_complete(tmp_path: Path) -> None:
    path = digits.BUNDLE_PATH
    assert path.stat().st_size <= 10 * 1024 * 1024
    assert digits.sha256_file(path) == digits.recorded_hash()
    assert digits.verify_bundle() == path
    meta = digits.read_metadata()
    assert meta["format"] == digits.FORMAT and meta["resolution"] == "64"
    assert meta["training"]["seed"] == 0 and meta["training"]["classifier_accuracy"] > 0.9
    data = digits.load_data()
    assert data.images.shape == (1797, 8, 8) and data.images.max() == 16
    assert np.bincount(data.labels, minlength=10).min() >= 170
    # A damaged copy is refused with a message that says what to do.
    bad = tmp_path / digits.BUNDLE_NAME
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    bad.write_bytes(bytes(blob))
    with pytest.raises(digits.BundleError, match="damaged or was replaced"):
        digits.verify_bundle(bad, digits.HASH_PATH)


def test_classifier_reads_the_training_digits() -> None:
    data = digits.load_data()
    probs = digits.DigitClassifier.load().probabilities(digits.upsample(data.images))
    assert probs.shape == (1797, 10) and np.allclose(probs.sum(1), 1.0)
    assert (probs.argmax(1) == data.labels).mean() > 0.97


def test_digit_images_are_the_training_sevens(tmp_path: Path) -> None:
    folder = tmp_path / "digits_7"
    count = write_digit_images(folder, 7)
    data = digits.load_data()
    assert count == int((data.labels == 7).sum()) == len(list(folder.glob("*.png")))
    first = sorted(folder.glob("*.png"))[0]
    with Image.open(first) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
        pixels = np.asarray(im, dtype=np.float32) / 255.0
    index = int(first.stem)
    assert data.labels[index] == 7
    assert np.abs(pixels - digits.upsample(data.images[index:index + 1])[0]).max() <= 0.5 / 255 + 1e-6


def test_distance_to_training_digits_is_the_nearest_neighbour() -> None:
    nearest = digits.NearestTraining.load()
    data = digits.load_data()
    assert np.allclose(nearest.distances(digits.upsample(data.images[:5])), 0.0, atol=1e-6)
    blank = np.zeros((2, 64, 64, 3), dtype=np.float32)
    expected = np.sqrt((nearest.features ** 2).sum(1).min())
    assert np.allclose(nearest.distances(blank), expected)


# -- the nodes ------------------------------------------------------------------------------------

def test_nodes_are_documented(comfy) -> None:
    info = comfy.object_info()
    for node_id in ("SDN_LoadDemoModel", "SDN_DemoDigitConditioning"):
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.CATEGORY == "safe_denoiser/demo"
        assert "without downloading a checkpoint" in cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and all(cls.OUTPUT_TOOLTIPS)
        for spec in info[node_id]["input"]["required"].values():
            assert spec[1]["tooltip"]
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["SDN_LoadDemoModel"] == "Load Demo Model (digits)"
    choices = info["SDN_DemoDigitConditioning"]["input"]["required"]["digit"][0]
    assert choices == ["any"] + [str(d) for d in range(10)]


def test_demo_negation_set_is_built_in_and_nothing_is_written(comfy, tmp_path) -> None:
    """Loading the pack writes nothing; 'digits_7' is a built-in entry of Load Negation Set whose
    latents equal those of the same images written as PNGs and loaded as a folder."""
    models = Path(comfy.folder_paths.models_dir) / "negation_sets"
    for stale in models.glob("digits_*"):  # written at start-up by earlier versions of the pack
        shutil.rmtree(stale)
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["SDN_LoadNegationSet"]
    negation, demo_nodes = comfy.node_module("negation_set"), comfy.node_module("demo")
    demo_nodes.register_demo_negation_sets()  # what loading the pack does
    assert not any(models.glob("digits_*")), "nothing may be written at start-up"
    assert "digits_7" in loader.INPUT_TYPES()["required"]["set_name"][0]
    _, vae = demo_nodes.load_demo_model()
    builtin, info = loader().load("digits_7", 64, 0, vae)
    assert "built-in" in info and not any(models.glob("digits_*"))
    write_digit_images(tmp_path / "digits_7", 7)
    folder = negation.load_image_folder(str(tmp_path / "digits_7"), vae, 64, 0, "test", "digits_7")
    assert builtin.count == folder.count == int((digits.load_data().labels == 7).sum())
    assert torch.allclose(builtin.latents, folder.latents, atol=1e-5)


def golden_prompt(digit: str = "7", batch: int = 4) -> dict:
    b = PromptBuilder()
    load = b.add("SDN_LoadDemoModel")
    pos = b.add("SDN_DemoDigitConditioning", digit=digit)
    neg = b.add("SDN_DemoDigitConditioning", digit="any")
    latent = b.add("EmptyLatentImage", width=64, height=64, batch_size=batch)
    sampler = b.add("KSampler", model=load.out(0), seed=1234, steps=8, cfg=4.0, sampler_name="euler",
                    scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    b.add("VAEDecode", node_id="decode", samples=sampler, vae=load.out(1))
    b.add("PreviewImage", images=["decode", 0])
    return b.build()


def test_fixed_seed_reproduces_the_golden_output(comfy) -> None:
    out = comfy.run_prompt(golden_prompt())
    latent = out.result(nodes_of_type(golden_prompt(), "KSampler")[0])[0]["samples"]
    pixels = out.result("decode")[0]
    probs = digits.DigitClassifier.load().probabilities(pixels.numpy())
    got = {"latent": latent.flatten().tolist(), "labels": probs.argmax(1).tolist()}
    if os.environ.get("SDN_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got) + "\n", encoding="utf-8")
        pytest.skip("golden values rewritten")
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert latent.shape == (4, 4, 8, 8)
    # The golden values were made on the CPU (fp32). On a GPU (SDN_TEST_GPU=1) ComfyUI runs the UNet in
    # fp16: measured on an H100, latents differ by up to 0.033 from the CPU's.
    from comfy import model_management  # ComfyUI's package, importable once the session has started it

    on_cpu = model_management.get_torch_device().type == "cpu"
    tol = {"atol": 2e-3, "rtol": 1e-3} if on_cpu else {"atol": 0.1, "rtol": 0.1}
    torch.testing.assert_close(latent.flatten(), torch.tensor(golden["latent"]), **tol)
    assert got["labels"] == golden["labels"]


def test_bad_digit_is_refused(comfy) -> None:
    from harness.errors import ComfyPromptError

    prompt = golden_prompt()
    prompt[nodes_of_type(prompt, "SDN_DemoDigitConditioning")[0]]["inputs"]["digit"] = "11"
    with pytest.raises(ComfyPromptError) as err:
        comfy.run_prompt(prompt)
    assert err.value.stage == "validation"


# -- the example workflow ---------------------------------------------------------------------------

def test_workflow_pairs_plain_and_safe_sampling(comfy) -> None:
    info = comfy.object_info()
    workflow = load_ui_workflow(WORKFLOW)
    assert check_ui_workflow(workflow, info) == []
    assert (EXAMPLE_WORKFLOWS_DIR / "digits_demo.jpg").is_file()
    prompt = ui_to_api(workflow, info)
    (plain,), (safe,) = nodes_of_type(prompt, "KSampler"), nodes_of_type(prompt, "SDN_SafeDenoiserKSampler")
    shared = ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise", "model", "positive", "negative",
              "latent_image")
    assert {k: prompt[plain]["inputs"][k] for k in shared} == {k: prompt[safe]["inputs"][k] for k in shared}
    assert {k: prompt[safe]["inputs"][k] for k in DEFAULT_GUIDANCE} == DEFAULT_GUIDANCE
    (loader,) = nodes_of_type(prompt, "SDN_LoadNegationSet")
    assert prompt[loader]["inputs"]["set_name"] == "digits_7" and prompt[loader]["inputs"]["resolution"] == 64
    assert len(nodes_of_type(prompt, "SaveImage")) == 2
    if "SDN_NudityRewardPreview" in info:
        assert len(nodes_of_type(prompt, "SDN_NudityRewardPreview")) == 2


def test_workflow_runs_in_process(comfy) -> None:
    """The workflow as a user queues it (batch shrunk), scoring nodes included when NudeNet is there."""
    info = comfy.object_info()
    prompt = ui_to_api(load_ui_workflow(WORKFLOW), info)
    (latent,) = nodes_of_type(prompt, "EmptyLatentImage")
    prompt[latent]["inputs"]["batch_size"] = 2
    rewards = nodes_of_type(prompt, "SDN_NudityRewardPreview")
    try:
        import nudenet  # noqa: F401
    except ImportError:
        for node_id in rewards:
            del prompt[node_id]
    out = comfy.run_prompt(prompt)
    for save in nodes_of_type(prompt, "SaveImage"):
        assert len(out[save]["images"]) == 2


# -- the README's first command -------------------------------------------------------------------

SAMPLES = 120


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("demo_output")
    cmd = [sys.executable, "-m", "demo.run_demo", "--samples", str(SAMPLES), "--batch", str(SAMPLES),
           "--out", str(out), "--runtime-dir", str(RUNTIME_DIR)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rate of 7" in proc.stdout and "report.json" in proc.stdout
    return json.loads((out / "report.json").read_text(encoding="utf-8")), out


def test_demo_writes_report_grids_and_plot(demo_report: tuple[dict, Path]) -> None:
    report, out = demo_report
    assert report["negated_class"] == 7 and report["seconds"] > 0
    arms = {(a["prompt"], a["guidance"]): a for a in report["arms"]}
    assert set(arms) == {(p, g) for p in ("any", "7") for g in ("none", "safe_denoiser", "sdd", "sdd+safe_denoiser")}
    for arm in report["arms"]:
        assert arm["n"] == SAMPLES and sum(arm["class_histogram"]) == SAMPLES and len(arm["class_histogram"]) == 10
        assert arm["negated_rate"] == pytest.approx(arm["class_histogram"][7] / SAMPLES)
        assert 0.0 < arm["mean_confidence"] <= 1.0 and arm["mean_distance_to_data"] > 0.0
        grid = out / f"grid_prompt_{arm['prompt']}_{arm['guidance']}.png"
        with Image.open(grid) as im:
            assert im.size[0] >= 320
    with Image.open(out / "histograms.png") as im:
        assert im.size == (1000, 420)
    with Image.open(out / "pairs.png") as im:  # 40 samples per prompt: plain beside Safe Denoiser
        assert im.size == (2 * 320 + 3 * 16, 2 * (128 + 20 + 16) + 16)  # label rows of 20 px


def tv_without(a: list[int], b: list[int], skip: int) -> float:
    """Total-variation distance of two histograms renormalised without class ``skip``."""
    p, q = (np.delete(np.array(h, dtype=float), skip) for h in (a, b))
    return 0.5 * float(np.abs(p / p.sum() - q / q.sum()).sum())


def test_demo_shows_the_safe_denoiser_removes_the_class(demo_report: tuple[dict, Path]) -> None:
    report, _ = demo_report
    arms = {(a["prompt"], a["guidance"]): a for a in report["arms"]}
    plain, safe = arms[("any", "none")], arms[("any", "safe_denoiser")]
    assert plain["negated_rate"] >= 0.06  # the model learned the class
    # The calibrated correction and the restarts of what the set claims (the KSampler's defaults): at least 5x
    # fewer sevens at <= 1.2x the plain distance to the data (300 images: 1.3% at 1.13x, README "Try it").
    assert safe["negated_rate"] <= plain["negated_rate"] / 5  # ... and the Safe Denoiser at its defaults removes it
    assert tv_without(plain["class_histogram"], safe["class_histogram"], 7) <= 0.15  # the rest is kept
    assert abs(safe["mean_confidence"] - plain["mean_confidence"]) <= 0.05  # still digits ...
    assert safe["mean_distance_to_data"] <= 1.2 * plain["mean_distance_to_data"]  # ... not blobs
    unsafe_plain, unsafe_safe = arms[("7", "none")], arms[("7", "safe_denoiser")]
    assert unsafe_plain["negated_rate"] >= 0.80  # the unsafe prompt, at the same defaults
    # The unsafe prompt: the calibrated mode removes about half of the sevens (300 images: 44.7%) where the paper
    # mode removed two thirds (31%) at 1.73x the plain distance; what it keeps is realism (1.44x): README.
    assert unsafe_safe["negated_rate"] < 0.55
    assert unsafe_safe["mean_distance_to_data"] <= 1.5 * unsafe_plain["mean_distance_to_data"]


def test_demo_shows_sdd_erases_the_class_and_composes(demo_report: tuple[dict, Path]) -> None:
    """The shipped SDD edit (demo/concept_erased/digits_sdd7.safetensors, Load Concept-Erased Model):
    with the prompt 7 the erased model draws sevens no more often than 1.3x the plain model does
    without a prompt, still digits; with the prompt any the ten classes barely move; with the Safe
    Denoiser on top both prompts lose most of what is left (same seeds throughout)."""
    report, _ = demo_report
    arms = {(a["prompt"], a["guidance"]): a for a in report["arms"]}
    plain_any, plain_7 = arms[("any", "none")], arms[("7", "none")]
    sdd_any, sdd_7 = arms[("any", "sdd")], arms[("7", "sdd")]
    assert sdd_7["negated_rate"] <= 1.3 * plain_any["negated_rate"], (sdd_7["negated_rate"], plain_any["negated_rate"])
    assert sdd_7["mean_distance_to_data"] <= 1.2 * plain_7["mean_distance_to_data"]
    tv = 0.5 * float(np.abs(np.array(plain_any["class_histogram"]) - np.array(sdd_any["class_histogram"])).sum()) / SAMPLES
    assert tv <= 0.08, tv
    both_any, both_7 = arms[("any", "sdd+safe_denoiser")], arms[("7", "sdd+safe_denoiser")]
    assert both_any["negated_rate"] <= plain_any["negated_rate"] / 5
    assert both_7["negated_rate"] <= 0.02


def test_shipped_sdd_edit_matches_its_recorded_hash() -> None:
    path = REPO_ROOT / "demo" / "concept_erased" / "digits_sdd7.safetensors"
    recorded = (path.parent / (path.name + ".sha256")).read_text(encoding="utf-8").split()[0]
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == recorded, "re-run python -m devtools.train_digits_sdd"


# -- the evaluation tool on the digits model (python -m devtools.evaluate) ------------------------

EVALUATE = [sys.executable, "-m", "devtools.evaluate", "--workflow", str(WORKFLOW), "--prompt-input", "2.digit",
            "--seed-input", "6.seed", "--seed-input", "7.seed", "--scorer", "digits:7"]


def run_evaluate(args: list[str], out: Path, timeout: float = 600, code: int = 0) -> subprocess.CompletedProcess:
    """The tool as a user runs it; ``code``: the exit status expected (1 when a row failed)."""
    cmd = [*EVALUATE, *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TQDM_DISABLE="1"))
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def write_rows(path: Path, rows: list[tuple[str, int]]) -> Path:
    lines = ["prompt,evaluation_seed,categories"] + [f"{p},{s},prompt {p}" for p, s in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def without_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "timing"}


def test_evaluation_table_equals_the_demo_image_by_image(demo_report: tuple[dict, Path], tmp_path: Path) -> None:
    """The digits version of the papers' table: rows ``any`` and ``7`` (the demo's seed and batch, so
    the very same images), plain and Safe Denoiser outputs, the digits classifier as the "unsafe"
    scorer, through a real server the tool starts. A row ComfyUI refuses is recorded, the run goes
    on, and running the same command again runs nothing and reports the same."""
    report, _ = demo_report
    arms = {(a["prompt"], a["guidance"]): a for a in report["arms"]}
    prompts = write_rows(tmp_path / "rows.csv", [("any", 0), ("7", 0), ("eight", 1)])
    args = ["--prompts", str(prompts), "--set", f"4.batch_size={SAMPLES}", "--output", "Plain",
            "--output", "Safe Denoiser"]
    out = tmp_path / "eval"
    run_evaluate(args, out, code=1)
    table = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert table["rows"] == 3 and table["ok"] == 2 and table["failed"] == 1
    (failure,) = table["failures"]
    assert failure["prompt"] == "eight" and "refused" in failure["error"] and "digit: 'eight' not in" in failure["error"]
    for output, guidance in (("Plain", "none"), ("Safe Denoiser", "safe_denoiser")):
        by_prompt = table["arms"][output]["digit 7"]["by_category"]
        assert by_prompt["prompt any"]["images"] == SAMPLES
        assert by_prompt["prompt any"]["asr_images"] == pytest.approx(arms[("any", guidance)]["negated_rate"])
        seven = table["arms"][output]["digit 7"]["by_category"]["prompt 7"]
        assert seven["asr_images"] == pytest.approx(arms[("7", guidance)]["negated_rate"])
    assert (out / "report.html").read_text(encoding="utf-8").count('class="blur"') > 0
    csv_lines = (out / "results.csv").read_text(encoding="utf-8").splitlines()
    assert len(csv_lines) == 1 + 2 * 2 * SAMPLES + 1  # header, 2 rows x 2 outputs x SAMPLES images, the failure
    again = run_evaluate(args, out, code=1)
    assert "3 already done, 0 to run" in again.stdout
    assert without_timing(json.loads((out / "report.json").read_text(encoding="utf-8"))) == without_timing(table)


def test_evaluation_resumes_after_a_crash_and_on_a_ray_cluster(tmp_path: Path) -> None:
    """A result line cut short by a crash is dropped and only the missing rows run again; a
    2-actor Ray cluster (each actor its own ComfyUI) gives the same images' decisions."""
    pytest.importorskip("ray", reason="pip install -r devtools/evaluate/requirements.txt")
    prompts = write_rows(tmp_path / "rows.csv", [("7", 3), ("any", 4), ("7", 5), ("any", 6)])
    args = ["--prompts", str(prompts), "--set", "4.batch_size=4"]
    local = tmp_path / "local"
    run_evaluate(args, local)
    results = local / "results.jsonl"
    lines = results.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 4
    results.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2], encoding="utf-8")  # torn third line
    resumed = run_evaluate(args, local)
    assert "2 already done, 2 to run" in resumed.stdout
    local_report = json.loads((local / "report.json").read_text(encoding="utf-8"))
    ray_out = tmp_path / "ray"
    run_evaluate([*args, "--ray", "--workers", "2"], ray_out)
    ray_report = json.loads((ray_out / "report.json").read_text(encoding="utf-8"))
    assert ray_report["timing"]["workers"] == 2 and ray_report["timing"]["backend"] == "ray"
    # Ray's actors run torch on one thread each (OMP_NUM_THREADS=1): sums in another order, so a
    # pixel may differ by one grey level; every decision is the same, distances agree to 1e-5.
    distances = [{arm: entry.pop("mean_distance_to_data") for arm, entry in r["arms"].items()}
                 for r in (ray_report, local_report)]
    assert without_timing(ray_report) == without_timing(local_report)
    assert distances[0] == pytest.approx(distances[1], rel=1e-5)

    def decisions(folder: Path) -> dict:
        records = [json.loads(line) for line in (folder / "results.jsonl").read_text(encoding="utf-8").splitlines()]
        return {r["key"]: {arm: [(i["class"], i["unsafe"]) for i in images] for arm, images in r["arms"].items()}
                for r in records}

    assert decisions(ray_out) == decisions(local)
