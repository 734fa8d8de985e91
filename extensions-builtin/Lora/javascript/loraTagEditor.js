// A small editor for one <lora:...> tag in a prompt box: right-click the tag (or put the caret in it and press
// Alt+E). Sliders for te and unet, per-block weights grouped BASE/IN/MID/OUT with LoRA Block Weight's presets,
// start/stop, and a live preview. Apply rewrites only that tag, as one edit the browser can undo (Ctrl+Z).
// Works on this web UI and in A1111 (it only uses the page's textareas and GET /lora/block-weights).
(function() {
    "use strict";

    const TAG = /<(lora|lyco):([^>]+)>/g;
    const BLOCK_KEYS = /^(in|mid|out|base|in\d\d|m00|out\d\d|double|single|blocks|clip|t5|[dsb]\d\d)$/i;

    // The group a block id is shown under (and set by a readable key of that name): UNet BASE/IN/MID/OUT, Flux's
    // CLIP/T5 (TEXT, set by base=), IN, Dnn (DOUBLE), Snn (SINGLE), OUT, and a DiT's numbered Bnn (BLOCKS).
    function groupOf(id) {
        if (id === "BASE") return "BASE";
        if (id === "CLIP" || id === "T5") return "TEXT";
        if (/^D\d+$/.test(id)) return "DOUBLE";
        if (/^S\d+$/.test(id)) return "SINGLE";
        if (/^B\d+$/.test(id)) return "BLOCKS";
        return id.startsWith("IN") ? "IN" : id.startsWith("M") ? "MID" : "OUT";
    }
    let info = null; // /lora/block-weights: {family, blocks, forms, presets}
    let panel = null;

    function root() {
        return typeof window.gradioApp === "function" ? window.gradioApp() : document;
    }

    function el(tag, className, text) {
        const node = document.createElement(tag);
        if (className) node.className = className;
        if (text !== undefined) node.textContent = String(text);
        return node;
    }

    // The tag whose text contains the caret position, or null.
    function tagAt(text, pos) {
        TAG.lastIndex = 0;
        let m;
        while ((m = TAG.exec(text)) !== null) {
            if (pos > m.index && pos < m.index + m[0].length) {
                return {start: m.index, end: m.index + m[0].length, kind: m[1], args: m[2]};
            }
        }
        return null;
    }

    function isNumber(text) {
        return text !== "" && text !== null && Number.isFinite(Number(text));
    }

    // A1111's split: items at ':', `key=value` items are named. Named keys keep their order.
    function parseTag(tag) {
        const items = tag.args.split(":");
        const positional = [];
        const named = new Map();
        items.forEach(item => {
            const eq = item.indexOf("=");
            if (eq > 0) named.set(item.slice(0, eq).trim(), item.slice(eq + 1).trim());
            else positional.push(item.trim());
        });
        const state = {kind: tag.kind, name: positional[0] || "", te: positional[1] || "1", unet: null,
            dyn: positional[3] || null, lbw: null, named: named};
        if (positional.length > 2) {
            const third = positional[2];
            if (info && (third in info.presets || String(third.split(",").length) in (info.forms || {}))) state.lbw = third;
            else state.unet = third;
        }
        if (named.has("te")) state.te = named.get("te");
        if (named.has("unet")) state.unet = named.get("unet");
        if (named.has("lbw") || named.has("w")) state.lbw = named.get("lbw") || named.get("w");
        ["te", "unet", "lbw", "w"].forEach(k => named.delete(k));
        return state;
    }

    // A vector or preset text → one value per block of the loaded family (LBW: unlisted blocks get 0).
    function expand(text) {
        if (!info || !info.blocks.length) return null;
        const source = text in info.presets ? info.presets[text] : text;
        const values = source.split(",").map(v => Number(v.trim()));
        if (values.some(v => !Number.isFinite(v))) return null;
        const ids = info.forms[String(values.length)];
        if (!ids) {
            return new Set(values).size === 1 ? info.blocks.map(() => values[0]) : null;
        }
        const byId = Object.create(null);
        ids.forEach((id, i) => { byId[id] = values[i]; });
        return info.blocks.map(id => (id in byId ? byId[id] : 0));
    }

    function readableValues(named) {
        const values = info.blocks.map(() => 1);
        named.forEach((value, key) => {
            if (!BLOCK_KEYS.test(key) || !isNumber(value)) return;
            const k = key.toUpperCase();
            info.blocks.forEach((id, i) => {
                const group = groupOf(id);
                if (k === id || k === group || (k === "MID" && id === "M00") || (k === "BASE" && group === "TEXT")) {
                    values[i] = Number(value);
                }
            });
        });
        return values;
    }

    function fmt(x) {
        return String(Math.round(Number(x) * 1000) / 1000);
    }

    function tagText(state, blockValues, presetName) {
        const parts = [state.name, state.te];
        if (state.unet !== null && state.unet !== "" && state.unet !== state.te) parts.push(state.unet);
        const named = new Map(state.named);
        [...named.keys()].forEach(k => { if (BLOCK_KEYS.test(k)) named.delete(k); });
        if (state.dyn) named.set("dyn", state.dyn);
        if (blockValues && blockValues.some(v => v !== 1)) {
            const preset = presetName && expand(presetName);
            const same = preset && preset.every((v, i) => v === blockValues[i]);
            named.set("lbw", same ? presetName : blockValues.map(fmt).join(","));
        } else if (!blockValues && state.lbw) {
            named.set("lbw", state.lbw); // no block list for this model: keep what was written
        }
        ["start", "stop"].forEach(k => {
            const v = state[k];
            if (v === undefined) return;
            if (v === "") named.delete(k); else named.set(k, v);
        });
        named.forEach((v, k) => parts.push(`${k}=${v}`));
        return `<${state.kind}:${parts.join(":")}>`;
    }

    function close() {
        if (panel) panel.remove();
        panel = null;
    }

    function sliderRow(label, value, min, max, onChange) {
        const row = el("div", "lora-tag-editor-row");
        row.appendChild(el("label", "", label));
        const range = el("input");
        range.type = "range";
        range.min = String(min);
        range.max = String(max);
        range.step = "0.05";
        const text = el("input", "lora-tag-editor-value");
        text.type = "text";
        text.value = value;
        text.dataset.key = label;
        range.dataset.key = label;
        range.disabled = !isNumber(value); // a keyframe schedule (0@0,1@0.5) is edited as text
        if (isNumber(value)) range.value = value;
        range.addEventListener("input", () => { text.value = fmt(range.value); onChange(text.value); });
        text.addEventListener("input", () => {
            range.disabled = !isNumber(text.value);
            if (isNumber(text.value)) range.value = text.value;
            onChange(text.value.trim());
        });
        row.append(range, text);
        return row;
    }

    function open(textarea, tag) {
        close();
        const state = parseTag(tag);
        state.start = state.named.has("start") ? state.named.get("start") : "";
        state.stop = state.named.has("stop") ? state.named.get("stop") : "";
        state.named.delete("start");
        state.named.delete("stop");
        const hasBlocks = !!(info && info.blocks.length);
        let blocks = null;
        let presetName = null;
        if (hasBlocks) {
            blocks = state.lbw ? expand(state.lbw) : readableValues(state.named);
            if (state.lbw && !blocks) blocks = null;
            if (state.lbw && state.lbw in info.presets) presetName = state.lbw;
        }

        panel = el("div", "lora-tag-editor");
        panel.setAttribute("role", "dialog");
        const preview = el("code", "lora-tag-editor-preview");
        const refresh = () => { preview.textContent = tagText(state, blocks, presetName); };
        panel.appendChild(el("div", "lora-tag-editor-title", `${state.kind}: ${state.name}`));
        // A tag without its own unet weight uses te for both (A1111): the unet field follows te until edited.
        const unetRow = sliderRow("unet", state.unet === null ? state.te : state.unet, -1, 2,
            v => { state.unet = v; refresh(); });
        panel.appendChild(sliderRow("te", state.te, -1, 2, v => {
            state.te = v;
            if (state.unet === null) {
                unetRow.querySelector("input[type=text]").value = v;
                const range = unetRow.querySelector("input[type=range]");
                range.disabled = !isNumber(v);
                if (isNumber(v)) range.value = v;
            }
            refresh();
        }));
        panel.appendChild(unetRow);
        ["start", "stop"].forEach(key => {
            const row = el("div", "lora-tag-editor-row");
            row.appendChild(el("label", "", key));
            const input = el("input", "lora-tag-editor-value");
            input.type = "text";
            input.dataset.key = key;
            input.value = state[key];
            input.placeholder = key === "start" ? "step or fraction" : "";
            input.addEventListener("input", () => { state[key] = input.value.trim(); refresh(); });
            row.appendChild(input);
            panel.appendChild(row);
        });
        if (hasBlocks && blocks) {
            const presetRow = el("div", "lora-tag-editor-row");
            presetRow.appendChild(el("label", "", "preset"));
            const select = el("select", "lora-tag-editor-preset");
            select.appendChild(el("option", "", "(custom)"));
            Object.keys(info.presets).forEach(name => {
                if (!expand(name)) return; // a preset of another family's length
                const option = el("option", "", name);
                option.value = name;
                select.appendChild(option);
            });
            select.value = presetName || "(custom)";
            presetRow.appendChild(select);
            panel.appendChild(presetRow);
            const grid = el("div", "lora-tag-editor-blocks");
            const sliders = [];
            let group = "";
            info.blocks.forEach((id, i) => {
                const g = groupOf(id);
                if (g !== group) {
                    grid.appendChild(el("div", "lora-tag-editor-group", g));
                    group = g;
                }
                const row = sliderRow(id, fmt(blocks[i]), -1, 2, v => {
                    if (!isNumber(v)) return;
                    blocks[i] = Number(v);
                    presetName = null;
                    select.value = "(custom)";
                    refresh();
                });
                sliders.push(row);
                grid.appendChild(row);
            });
            select.addEventListener("change", () => {
                const values = expand(select.value);
                if (!values) return;
                presetName = select.value;
                blocks = values;
                sliders.forEach((row, i) => {
                    row.querySelector("input[type=range]").value = String(values[i]);
                    row.querySelector("input[type=text]").value = fmt(values[i]);
                });
                refresh();
            });
            panel.appendChild(grid);
        }
        panel.appendChild(preview);
        const buttons = el("div", "lora-tag-editor-buttons");
        const apply = el("button", "lora-tag-editor-apply", "Apply");
        const cancel = el("button", "lora-tag-editor-cancel", "Cancel");
        apply.type = cancel.type = "button";
        apply.addEventListener("click", () => {
            replaceTag(textarea, tag, tagText(state, blocks, presetName));
            close();
        });
        cancel.addEventListener("click", close);
        buttons.append(apply, cancel);
        panel.appendChild(buttons);
        panel.addEventListener("keydown", e => { if (e.key === "Escape") { e.preventDefault(); close(); } });
        refresh();
        document.body.appendChild(panel);
        const box = textarea.getBoundingClientRect();
        panel.style.left = `${Math.max(4, Math.min(box.left, window.innerWidth - panel.offsetWidth - 4))}px`;
        panel.style.top = `${Math.max(4, Math.min(box.bottom + 4, window.innerHeight - panel.offsetHeight - 4))}px`;
        panel.querySelector("input").focus();
    }

    // One undoable edit: the browser's own insertText keeps the textarea's undo stack (Ctrl+Z restores the tag).
    function replaceTag(textarea, tag, text) {
        textarea.focus();
        textarea.setSelectionRange(tag.start, tag.end);
        if (!document.execCommand("insertText", false, text)) textarea.setRangeText(text, tag.start, tag.end, "end");
        if (typeof window.updateInput === "function") window.updateInput(textarea);
    }

    function loadInfo() {
        return fetch("./lora/block-weights", {credentials: "same-origin"})
            .then(r => (r.ok ? r.json() : null))
            .then(data => { info = data && Array.isArray(data.blocks) ? data : null; })
            .catch(() => { info = null; });
    }

    function openAtCaret(textarea, event) {
        const tag = tagAt(textarea.value, textarea.selectionStart);
        if (!tag) return false;
        if (event) event.preventDefault();
        loadInfo().then(() => open(textarea, tag)); // the loaded model may have changed: fresh block list
        return true;
    }

    function isPromptBox(target) {
        return target && target.tagName === "TEXTAREA" && !!target.closest("[id$='_prompt'], [id$='_neg_prompt']");
    }

    document.addEventListener("contextmenu", e => {
        const target = e.composedPath ? e.composedPath()[0] : e.target;
        if (isPromptBox(target)) openAtCaret(target, e);
    }, true);
    document.addEventListener("keydown", e => {
        const target = e.composedPath ? e.composedPath()[0] : e.target;
        if (e.altKey && !e.ctrlKey && !e.metaKey && (e.key === "e" || e.key === "E") && isPromptBox(target)) {
            openAtCaret(target, e);
        }
    }, true);
    document.addEventListener("mousedown", e => {
        if (panel && !panel.contains(e.target)) close();
    }, true);

    const style = document.createElement("style");
    style.textContent = `
.lora-tag-editor { position: fixed; z-index: 10000; background: var(--background-fill-primary, #fff);
  color: var(--body-text-color, #111); border: 1px solid var(--border-color-primary, #888); border-radius: 6px;
  padding: 8px; max-height: 80vh; overflow: auto; min-width: 320px; box-shadow: 0 4px 16px rgba(0,0,0,.3);
  font-size: 13px; }
.lora-tag-editor-title { font-weight: bold; margin-bottom: 4px; }
.lora-tag-editor-row { display: flex; gap: 6px; align-items: center; margin: 2px 0; }
.lora-tag-editor-row label { width: 48px; }
.lora-tag-editor-row input[type=range] { flex: 1; }
.lora-tag-editor-value { width: 90px; }
.lora-tag-editor-group { font-weight: bold; margin-top: 6px; }
.lora-tag-editor-preview { display: block; margin: 6px 0; word-break: break-all; }
.lora-tag-editor-buttons { display: flex; gap: 8px; justify-content: flex-end; }`;
    document.head.appendChild(style);

    window.loraTagEditor = {tagAt: tagAt, open: openAtCaret, close: close};
})();
