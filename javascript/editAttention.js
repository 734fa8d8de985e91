// Ctrl+Up / Ctrl+Down inside `<lora:name:0.5>` in a prompt changes the weight by keyedit_precision_extra
// (A1111 behaviour for extra-network tags; the step comes from the card pane's options, default 0.05).
(function() {
    "use strict";

    function precision() {
        const panes = window.extraNetworksPanes;
        if (panes) {
            for (const pane of panes.values()) {
                const value = Number(pane.opts && pane.opts.keyedit_precision_extra);
                if (value > 0) return value;
            }
        }
        return 0.05;
    }

    // Finds the `<type:name:weight...>` tag around the cursor; returns the weight's position or null.
    function weightAt(text, cursor) {
        const start = text.lastIndexOf("<", cursor - 1 < 0 ? 0 : cursor - 1);
        if (start < 0 || (text.lastIndexOf(">", cursor - 1) > start && text.lastIndexOf(">", cursor - 1) < cursor)) {
            return null;
        }
        const end = text.indexOf(">", start);
        if (end < 0 || end < cursor - 1) return null;
        const m = /^<[^:<>]+:[^:<>]+:(-?[0-9.]+)/.exec(text.slice(start, end + 1));
        if (!m) return null;
        const weightStart = start + m[0].length - m[1].length;
        return {start: weightStart, end: weightStart + m[1].length, value: parseFloat(m[1])};
    }

    function adjust(textarea, direction) {
        const found = weightAt(textarea.value, textarea.selectionStart);
        if (!found || isNaN(found.value)) return false;
        const step = precision();
        const decimals = Math.max(0, (String(step).split(".")[1] || "").length);
        const next = parseFloat((found.value + direction * step).toFixed(decimals));
        const text = String(next);
        textarea.value = textarea.value.slice(0, found.start) + text + textarea.value.slice(found.end);
        textarea.setSelectionRange(found.start, found.start + text.length);
        window.updateInput(textarea);
        return true;
    }

    document.addEventListener("keydown", event => {
        if (!(event.ctrlKey || event.metaKey) || (event.key !== "ArrowUp" && event.key !== "ArrowDown")) return;
        const target = event.target;
        if (target.tagName !== "TEXTAREA" || !target.closest("[id$='_prompt']")) return;
        if (adjust(target, event.key === "ArrowUp" ? 1 : -1)) event.preventDefault();
    });

    window.extraNetworksEditWeight = {weightAt: weightAt};
})();
