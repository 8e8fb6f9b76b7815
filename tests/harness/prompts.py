"""Build API-format prompts in Python, and the small standard prompts the tests share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .workflow import nodes_of_type, set_inputs, substitute_tiny, ui_to_api


@dataclass(frozen=True)
class NodeRef:
    """A node of a :class:`PromptBuilder`; ``ref.out(i)`` is the link to its output ``i``."""

    id: str

    def out(self, index: int = 0) -> list[Any]:
        return [self.id, index]


class PromptBuilder:
    """Incrementally build ``{node_id: {"class_type", "inputs"}}``.

    ``add(class_type, **inputs)`` returns a :class:`NodeRef`; passing a ``NodeRef`` as an input
    links that node's output 0, ``ref.out(i)`` links output ``i``.
    """

    def __init__(self) -> None:
        self.prompt: dict[str, dict[str, Any]] = {}

    def add(self, class_type: str, node_id: str | None = None, **inputs: Any) -> NodeRef:
        node_id = node_id or str(len(self.prompt) + 1)
        if node_id in self.prompt:
            raise ValueError(f"node id {node_id} already used")
        resolved = {k: (v.out(0) if isinstance(v, NodeRef) else v) for k, v in inputs.items()}
        self.prompt[node_id] = {"class_type": class_type, "inputs": resolved}
        return NodeRef(node_id)

    def build(self) -> dict[str, dict[str, Any]]:
        return {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in self.prompt.items()}


def tiny_txt2img(family: str = "sd15", *, sampler: str = "euler", scheduler: str = "normal",
                 steps: int = 3, cfg: float = 5.0, batch: int = 2, size: int = 64, seed: int = 0,
                 custom_sampler: bool = False) -> tuple[PromptBuilder, dict[str, NodeRef]]:
    """Tiny model + conditioning (+ zero uncond) -> KSampler or SamplerCustom -> VAEDecode -> Preview.

    Returns the builder and its named nodes (``model``, ``positive``, ``negative``, ``latent``,
    ``sampler``, ``vae``, ``decode``, ``preview``), so tests can rewire or extend it.
    """
    b = PromptBuilder()
    n: dict[str, NodeRef] = {}
    n["model"] = b.add("SDNTest_TinyModel", family=family, seed=seed)
    n["positive"] = b.add("SDNTest_TinyConditioning", seed=seed + 1, tokens=4, family=family, zero=False)
    n["negative"] = b.add("SDNTest_TinyConditioning", seed=seed + 1, tokens=4, family=family, zero=True)
    n["latent"] = b.add("EmptyLatentImage", width=size, height=size, batch_size=batch)
    if custom_sampler:
        select = b.add("KSamplerSelect", sampler_name=sampler)
        sigmas = b.add("BasicScheduler", model=n["model"], scheduler=scheduler, steps=steps, denoise=1.0)
        n["sampler"] = b.add("SamplerCustom", model=n["model"], add_noise=True, noise_seed=seed, cfg=cfg,
                             positive=n["positive"], negative=n["negative"], sampler=select,
                             sigmas=sigmas, latent_image=n["latent"])
    else:
        n["sampler"] = b.add("KSampler", model=n["model"], seed=seed, steps=steps, cfg=cfg,
                             sampler_name=sampler, scheduler=scheduler, positive=n["positive"],
                             negative=n["negative"], latent_image=n["latent"], denoise=1.0)
    n["vae"] = b.add("SDNTest_TinyVAE", seed=seed, channels=4)
    n["decode"] = b.add("VAEDecode", samples=n["sampler"], vae=n["vae"])
    n["preview"] = b.add("PreviewImage", images=n["decode"])
    return b, n


def exact_denoiser_sampling(*, count: int = 12, unsafe_count: int = 4, batch: int = 64,
                            steps: int = 20, sampler: str = "euler", scheduler: str = "normal",
                            family: str = "sd15", scale: float = 1.0, tolerance: float = 0.05,
                            seed: int = 0) -> tuple[PromptBuilder, dict[str, NodeRef]]:
    """Sample a tiny model whose network is the exact denoiser of a point set [count, 4, 8, 8].

    Nodes: ``model`` (tiny), ``points``, ``exact`` (patched MODEL), ``positive``, ``negative``,
    ``latent`` (64x64 -> 8x8 latents), ``sampler`` (KSampler, cfg 1), ``stats`` (PointStats).
    """
    b = PromptBuilder()
    n: dict[str, NodeRef] = {}
    n["model"] = b.add("SDNTest_TinyModel", family=family, seed=seed)
    n["points"] = b.add("SDNTest_PointSet", seed=seed, count=count, channels=4, height=8, width=8, scale=scale)
    n["exact"] = b.add("SDNTest_ExactDenoiser", model=n["model"], points=n["points"])
    n["positive"] = b.add("SDNTest_TinyConditioning", seed=seed + 1, tokens=4, family=family, zero=False)
    n["negative"] = b.add("SDNTest_TinyConditioning", seed=seed + 1, tokens=4, family=family, zero=True)
    n["latent"] = b.add("EmptyLatentImage", width=64, height=64, batch_size=batch)
    n["sampler"] = b.add("KSampler", model=n["exact"], seed=seed, steps=steps, cfg=1.0, sampler_name=sampler,
                         scheduler=scheduler, positive=n["positive"], negative=n["negative"],
                         latent_image=n["latent"], denoise=1.0)
    n["stats"] = b.add("SDNTest_PointStats", samples=n["sampler"], points=n["points"], model=n["exact"],
                       unsafe_count=unsafe_count, tolerance=tolerance)
    return b, n


def tiny_workflow_prompt(workflow: Mapping[str, Any], object_info: Mapping[str, Mapping[str, Any]], *,
                         steps: int = 3, size: int = 64, batch: int = 1,
                         resolution: int = 64) -> dict[str, dict[str, Any]]:
    """A UI workflow as a small API prompt on tiny models.

    Converted with ``object_info`` (a server's ``/object_info`` or the in-process one), real
    checkpoint/text encoders replaced (:func:`harness.workflow.substitute_tiny`), every
    ``EmptyLatentImage`` set to ``batch`` images of ``size`` px, every (Safe Denoiser) KSampler to
    ``steps`` steps and every Load Negation Set to encode at ``resolution`` px.
    """
    prompt = substitute_tiny(ui_to_api(workflow, object_info))
    resized = {"EmptyLatentImage": {"width": size, "height": size, "batch_size": batch},
               "KSampler": {"steps": steps}, "SDN_SafeDenoiserKSampler": {"steps": steps},
               "SDN_LoadNegationSet": {"resolution": resolution}}
    for class_type, values in resized.items():
        if nodes_of_type(prompt, class_type):
            set_inputs(prompt, class_type, **values)
    return prompt
