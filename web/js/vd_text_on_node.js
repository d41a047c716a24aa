// Shows the text a node of this pack returns as {"ui": {"text": [...]}} on the node itself
// (a read-only box under its widgets), so captions need no Preview Any node.
// Plain ES module, no build step; uses only app.registerExtension, beforeRegisterNodeDef,
// onExecuted and ComfyWidgets.STRING, which ComfyUI frontend 1.x provides.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

// This file is served at /extensions/<pack folder>/js/...; a node belongs to the pack when its
// python_module is custom_nodes.<pack folder>[.…] (the frontend's own rule for help pages).
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/")[2] || "");
const WIDGET = "vd_text";

function isPackNode(nodeData) {
  const module = String(nodeData?.python_module || "").split(".");
  return (module[0] === "custom_nodes" && module[1] === PACK)
    || String(nodeData?.category || "").startsWith("VersatileDiffusion");
}

function textOf(message) {
  const text = message?.text;
  if (text == null) return null;
  return (Array.isArray(text) ? text : [text]).map(String).join("\n");
}

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    // Added last and never saved (serialize: false), so widgets_values keep their order.
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false;
    widget.options = { ...(widget.options || {}), serialize: false };
    if (widget.element) {
      widget.element.readOnly = true;
      widget.element.dataset.vdText = "1";
      widget.element.placeholder = "text output";
    }
    // Room for a few lines (one per sentence) besides the widgets' own minimum.
    node.setSize?.([Math.max(node.size[0], 360), Math.max(node.size[1], node.computeSize()[1]) + 80]);
  }
  widget.value = text;
  if (widget.element) widget.element.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "VersatileDiffusion.TextOnNode",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isPackNode(nodeData)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = textOf(message);
      if (text !== null) showText(this, text);
    };
  },
});
