// Dragging a card (or a tree file row) into a prompt box inserts its text where it is dropped.
(function() {
    "use strict";

    const DRAG_TYPE = "application/x-webui-extra-network";
    const panes = window.extraNetworksPanes;
    const paneFor = window.extraNetworksPaneFor;

    class PaneDrop {
        // A card dropped on a prompt box: its text goes in at the drop point (moved there if it was already
        // in that box); dropped on the positive prompt, its negative text is also added to the negative box.
        cardDropped(item, textarea, offset) {
            const tools = window.extraNetworksPrompt;
            const {text, negative} = this.cardTexts(item);
            const areas = this.promptAreas();
            const separator = this.separator();
            const intoNegative = textarea === areas.negative;
            const inserted = intoNegative ? (negative || text) : text;
            if (!inserted) return;
            const result = tools.insertAtOffset(textarea.value, offset, inserted, separator);
            textarea.value = result.prompt;
            textarea.focus();
            textarea.setSelectionRange(result.caret, result.caret);
            window.updateInput(textarea);
            if (!intoNegative && negative && areas.negative && !tools.isInPrompt(areas.negative.value, negative)) {
                areas.negative.value = tools.addToPrompt(areas.negative.value, negative, separator);
                window.updateInput(areas.negative);
            }
            this.markActiveCards();
        }
    }
    window.cardsDom.addMethods(window.ExtraNetworksPane, PaneDrop);

    let dragged = null; // {pane, item} while a card is dragged

    function promptAreaOf(target) {
        if (!target || target.tagName !== "TEXTAREA") return null;
        return target.closest("[id$='_prompt'], [id$='_neg_prompt']") ? target : null;
    }

    function onDragStart(event) {
        const source = event.target.closest ? event.target.closest(".card, .tree-list-content-file") : null;
        const pane = source ? paneFor(source) : null;
        if (!pane || !event.dataTransfer) return;
        const item = pane.items[Number(source.dataset.index)];
        if (!item) return;
        const {text} = pane.cardTexts(item);
        dragged = {pane: pane, item: item};
        event.dataTransfer.effectAllowed = "copy";
        event.dataTransfer.setData("text/plain", text); // what other drop targets get
        event.dataTransfer.setData(DRAG_TYPE, JSON.stringify({pane: pane.root.id, index: item.index}));
    }

    function draggedCard(event) {
        if (dragged) return dragged;
        const types = event.dataTransfer ? Array.from(event.dataTransfer.types || []) : [];
        if (!types.includes(DRAG_TYPE)) return null;
        try { // dragged from another window of this page
            const data = JSON.parse(event.dataTransfer.getData(DRAG_TYPE));
            const pane = panes.get(data.pane);
            return pane && pane.items[data.index] ? {pane: pane, item: pane.items[data.index]} : null;
        } catch (e) {
            return null;
        }
    }

    function onDragOver(event) {
        if (!promptAreaOf(event.target)) return;
        const types = event.dataTransfer ? Array.from(event.dataTransfer.types || []) : [];
        if (!dragged && !types.includes(DRAG_TYPE)) return;
        event.preventDefault();
        event.dataTransfer.dropEffect = "copy";
    }

    function onDrop(event) {
        const area = promptAreaOf(event.target);
        if (!area) return;
        const source = draggedCard(event);
        if (!source) return;
        event.preventDefault(); // our insertion, not the browser's plain-text one
        const offset = window.extraNetworksPrompt.offsetFromPoint(area, event.clientX, event.clientY);
        source.pane.cardDropped(source.item, area, offset);
        dragged = null;
    }

    function onDragEnd() {
        dragged = null;
    }

    document.addEventListener("dragstart", onDragStart);
    document.addEventListener("dragover", onDragOver);
    document.addEventListener("drop", onDrop);
    document.addEventListener("dragend", onDragEnd);
})();
