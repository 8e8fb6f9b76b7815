// Nudity Reward Preview (SDN_NudityRewardPreview): after the node runs, show a compact table on
// the node with, per image, the nudity score, whether it is unsafe, the reward and the top NudeNet
// detections. The annotated images themselves are ordinary previews (ui.images) that ComfyUI
// draws on the node. Works with the classic frontend (ComfyUI 2024) and the current frontend
// package: only app.registerExtension, onExecuted and addDOMWidget are used.
import { app } from "../../scripts/app.js";

const NODE_TYPE = "SDN_NudityRewardPreview";
const WIDGET_NAME = "sdn_nudity_table";
const STYLE_ID = "sdn-nudity-style";
const ROW_HEIGHT = 20;
const MAX_VISIBLE_ROWS = 8;

const CSS = `
.sdn-nudity { font: 11px/1.35 ui-monospace, Menlo, Consolas, monospace; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border-radius: 4px; padding: 3px 5px; overflow: auto;
  box-sizing: border-box; }
.sdn-nudity-caption { opacity: 0.8; margin-bottom: 2px; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.sdn-nudity-warning { color: #e8a33d; white-space: normal; }
.sdn-nudity table { border-collapse: collapse; width: 100%; }
.sdn-nudity th { text-align: left; font-weight: 600; border-bottom: 1px solid #555; padding: 0 4px; }
.sdn-nudity td { padding: 0 4px; white-space: nowrap; }
.sdn-nudity td.sdn-top { white-space: normal; }
.sdn-nudity .sdn-unsafe { color: #ff5a5a; font-weight: 700; }
.sdn-nudity .sdn-safe { color: #5ad27a; }
.sdn-nudity .sdn-det-unsafe { color: #ff5a5a; }
`;

function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.appendChild(style);
}

function fmt(value, digits = 3) {
  return value === null || value === undefined || Number.isNaN(Number(value)) ? "-" : Number(value).toFixed(digits);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// rows: [{index, nudity, unsafe, reward, clip, top: [[class, score, unsafe], ...]}]
export function renderTable(container, rows, settings) {
  container.replaceChildren();
  const clip = settings.clip_term ? "CLIP term on" : "no CLIP term";
  const threshold = settings.threshold === undefined ? "" : ` \u2265 ${fmt(settings.threshold, 2)}`;
  const unsafeCount = rows.filter((r) => r.unsafe).length;
  container.appendChild(el("div", "sdn-nudity-caption",
    `${settings.preset ?? ""}${threshold} \u00b7 ${clip} \u00b7 ${unsafeCount}/${rows.length} unsafe`));
  if (settings.clip_warning) container.appendChild(el("div", "sdn-nudity-warning", settings.clip_warning));
  const table = el("table");
  const head = el("tr");
  for (const title of ["#", "nudity", "unsafe", "reward", "top detections"]) head.appendChild(el("th", "", title));
  table.appendChild(el("thead")).appendChild(head);
  const body = el("tbody");
  for (const row of rows) {
    const tr = el("tr");
    tr.appendChild(el("td", "", String(row.index)));
    tr.appendChild(el("td", "", fmt(row.nudity)));
    tr.appendChild(el("td", row.unsafe ? "sdn-unsafe" : "sdn-safe", row.unsafe ? "yes" : "no"));
    tr.appendChild(el("td", "", fmt(row.reward)));
    const top = el("td", "sdn-top");
    const detections = row.top ?? [];
    if (!detections.length) top.textContent = "none";
    detections.forEach(([name, score, unsafe], i) => {
      if (i) top.appendChild(document.createTextNode(", "));
      top.appendChild(el("span", unsafe ? "sdn-det-unsafe" : "", `${name} ${fmt(score, 2)}`));
    });
    tr.appendChild(top);
    body.appendChild(tr);
  }
  table.appendChild(body);
  container.appendChild(table);
}

function tableHeight(rows, settings) {
  const lines = Math.min(rows.length, MAX_VISIBLE_ROWS) + 2 + (settings.clip_warning ? 3 : 0);
  return lines * ROW_HEIGHT + 10;
}

function showTable(node, rows, settings) {
  ensureStyle();
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    const container = el("div", "sdn-nudity");
    container.dataset.sdnNode = String(node.id);
    widget = node.addDOMWidget(WIDGET_NAME, "sdn_nudity_table", container, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => widget.sdnHeight ?? 60,
      getMaxHeight: () => widget.sdnHeight ?? 60,
      getHeight: () => widget.sdnHeight ?? 60,
    });
    widget.serialize = false; // not a value: keep it out of saved workflows and prompts
    widget.serializeValue = () => undefined;
  }
  widget.sdnHeight = tableHeight(rows, settings);
  renderTable(widget.element, rows, settings);
  const wanted = node.computeSize?.() ?? node.size;
  node.setSize([Math.max(node.size[0], wanted[0], 420), Math.max(node.size[1], wanted[1])]);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "safe_denoiser.NudityRewardPreview",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const rows = message?.sdn_nudity;
      if (Array.isArray(rows)) {
        const settings = (message.sdn_nudity_settings ?? [])[0] ?? {};
        showTable(this, rows, settings);
      }
      return result;
    };
  },
});
