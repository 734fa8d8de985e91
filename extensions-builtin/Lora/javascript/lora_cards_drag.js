// Dragging a Lora card into a prompt box inside A1111, whose card pane is HTML rendered from this extension's items
// (ui_extra_networks_lora.create_item_html adds draggable="true" and data-lora-prompt: the tag as parts). The browser
// inserts the text where it is dropped and tells gradio through the input event. Our own host draws its cards itself
// (javascript/extraNetworks.js there) without data-lora-prompt, so this does nothing there.
document.addEventListener("dragstart", function(event) {
    var card = event.target && event.target.closest ? event.target.closest(".card[data-lora-prompt]") : null;
    if (!card || !event.dataTransfer) return;
    var parts;
    try {
        parts = JSON.parse(card.getAttribute("data-lora-prompt"));
    } catch (e) {
        return;
    }
    var options = window.opts || {};
    var text = parts.map(function(part) {
        if (part.opt !== undefined) return options[part.opt] === undefined ? "" : String(options[part.opt]);
        return String(part.text);
    }).join("");
    event.dataTransfer.setData("text/plain", text);
    event.dataTransfer.effectAllowed = "copy";
});
