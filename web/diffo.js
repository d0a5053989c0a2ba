// ComfyUI-DiffO frontend extension.
//  - A DiffO node that reports figures (the "text" of its UI output: sizes, bpp, metrics) shows them in a
//    read-only box on the node. The box is not saved in the workflow (serialize = false).
//  - DiffO Load Bitstream gets an upload button for .diffo files (ComfyUI's upload endpoint, into input/).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const REPORT_WIDGET = "diffo_report";

function showReport(node, lines) {
  let widget = node.widgets?.find((w) => w.name === REPORT_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, REPORT_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false;
    if (widget.options) widget.options.serialize = false;
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.85;
    }
  }
  widget.value = lines.join("\n");
  const wanted = node.computeSize();
  node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
  node.setDirtyCanvas?.(true, true);
}

function addUploadButton(node) {
  const combo = node.widgets?.find((w) => w.name === "bitstream_file");
  if (!combo) return;
  const picker = document.createElement("input");
  Object.assign(picker, { type: "file", accept: ".diffo" });
  picker.style.display = "none";
  document.body.append(picker);
  picker.onchange = async () => {
    const file = picker.files?.[0];
    picker.value = "";
    if (!file) return;
    const body = new FormData();
    body.append("image", file); // the endpoint's field name; it stores any file type
    body.append("type", "input");
    const resp = await api.fetchApi("/upload/image", { method: "POST", body });
    if (resp.status !== 200) {
      alert(`DiffO: uploading ${file.name} failed (${resp.status} ${resp.statusText})`);
      return;
    }
    const { name, subfolder } = await resp.json();
    const value = subfolder ? `${subfolder}/${name}` : name;
    if (!combo.options.values.includes(value)) combo.options.values.push(value);
    combo.value = value;
    combo.callback?.(value);
  };
  const button = node.addWidget("button", "upload .diffo file", null, () => picker.click());
  button.serialize = false;
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    picker.remove();
    return onRemoved?.apply(this, arguments);
  };
}

app.registerExtension({
  name: "DiffO.Nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.category?.startsWith("DiffO")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showReport(this, [].concat(message.text));
    };
    if (nodeData.name === "DiffOLoadBitstream") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        addUploadButton(this);
        return result;
      };
    }
  },
});
