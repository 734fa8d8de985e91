// Card click → prompt text: insert a card's text, or remove it when it is already there (A1111 toggle).
// Pure string functions, so the rules are testable without a page.
(function() {
    "use strict";

    function escapeRegExp(text) {
        return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    }

    // Joins the parts sent by the server: strings literally, {opt: name} from the current options.
    function textFromParts(parts, opts) {
        return (parts || []).map(function(part) {
            if (typeof part === "string") return part;
            if (part.opt !== undefined) {
                const value = opts ? opts[part.opt] : undefined;
                return value === undefined || value === null ? "" : String(value);
            }
            return String(part.text);
        }).join("");
    }

    // Builds the regex that finds an inserted text again, whatever weight or extra args it has now.
    // `<lora:name:0.8> trigger` matches `<lora:name>`, `<lora:name:-1.5e-1>` and `<lyco:name:1:unet=0>`
    // (A1111 only matched plain positive weights: 13B-17). `(neg:1)` matches `(neg:<any number>)`.
    function matcherFor(text) {
        let m = /^<([^:<>]+):([^:<>]+)(?::[^<>]*)?>([\s\S]*)$/.exec(text);
        if (m) {
            const kind = m[1].toLowerCase() === "lora" || m[1].toLowerCase() === "lyco" ?
                "(?:lora|lyco)" : escapeRegExp(m[1]);
            return {regex: new RegExp("<" + kind + ":" + escapeRegExp(m[2]) + "(?::[^<>]*)?>", "g"), suffix: m[3]};
        }
        m = /^\(([\s\S]+):[-+0-9.eE]+\)$/.exec(text);
        if (m) {
            return {regex: new RegExp("\\(" + escapeRegExp(m[1]) + ":[-+0-9.eE]+\\)", "g"), suffix: ""};
        }
        return {regex: new RegExp(escapeRegExp(text), "g"), suffix: ""};
    }

    // The [start, end) ranges that removing `text` takes out, last first: each occurrence (see matcherFor)
    // with the suffix that follows it and the separator before it (after it, at the very start).
    function rangesToRemove(prompt, text, separator) {
        const matcher = matcherFor(text);
        const found = Array.from(prompt.matchAll(matcher.regex));
        const ranges = [];
        for (let i = found.length - 1; i >= 0; i--) {
            let start = found[i].index;
            let end = start + found[i][0].length;
            if (matcher.suffix && prompt.startsWith(matcher.suffix, end)) end += matcher.suffix.length;
            if (separator && start >= separator.length && prompt.slice(start - separator.length, start) === separator) {
                start -= separator.length;
            } else if (separator && start === 0 && prompt.startsWith(separator, end)) {
                end += separator.length;
            }
            ranges.push([start, end]);
        }
        return ranges;
    }

    // Removes every occurrence of `text`; returns null when nothing was found.
    function removeFromPrompt(prompt, text, separator) {
        const ranges = rangesToRemove(prompt, text, separator);
        if (ranges.length === 0) return null;
        let result = prompt;
        ranges.forEach(([start, end]) => {
            result = result.slice(0, start) + result.slice(end);
        });
        return result;
    }

    // Inserts `text` at `offset` (a drop point): an occurrence already in the prompt is moved there, and a
    // separator goes between it and any word it would touch. Returns {prompt, caret} (caret: just after it).
    function insertAtOffset(prompt, offset, text, separator) {
        let result = prompt;
        let at = Math.max(0, Math.min(offset, prompt.length));
        rangesToRemove(prompt, text, separator).forEach(([start, end]) => {
            result = result.slice(0, start) + result.slice(end);
            if (at >= end) at -= end - start;
            else if (at > start) at = start;
        });
        at = snapOffset(result, at);
        const sep = separator === "" ? " " : separator;
        const before = result.slice(0, at);
        const after = result.slice(at);
        const left = before === "" || /\s$/.test(before) ? "" : sep;
        const right = after === "" || /^[\s,]/.test(after) ? "" : (sep.trim() === "" ? sep : " ");
        const inserted = left + text + right;
        return {prompt: before + inserted + after, caret: before.length + left.length + text.length};
    }

    // A drop point inside a word or a `<...>` tag moves to the nearer edge of it, so nothing is split.
    function snapOffset(text, at) {
        const open = text.lastIndexOf("<", at - 1);
        if (open >= 0 && text.lastIndexOf(">", at - 1) < open) {
            const close = text.indexOf(">", open);
            if (close >= at) return at - open <= close + 1 - at ? open : close + 1;
        }
        const boundary = /[\s,]/;
        if (at <= 0 || at >= text.length || boundary.test(text[at - 1]) || boundary.test(text[at])) return at;
        let start = at;
        while (start > 0 && !boundary.test(text[start - 1])) start--;
        let end = at;
        while (end < text.length && !boundary.test(text[end])) end++;
        return at - start <= end - at ? start : end;
    }

    // The character offset in a textarea under a viewport point (where a drop lands). Browsers with
    // caretPositionFromPoint answer for text controls; elsewhere a hidden copy of the textarea is measured.
    function offsetFromPoint(textarea, x, y) {
        if (document.caretPositionFromPoint) {
            const position = document.caretPositionFromPoint(x, y);
            if (position && position.offsetNode === textarea) return position.offset;
        }
        return offsetFromMirror(textarea, x, y);
    }

    const MIRRORED = ["boxSizing", "width", "height", "paddingTop", "paddingRight", "paddingBottom", "paddingLeft",
        "borderTopWidth", "borderRightWidth", "borderBottomWidth", "borderLeftWidth", "borderStyle", "fontFamily",
        "fontSize", "fontWeight", "fontStyle", "letterSpacing", "lineHeight", "textTransform", "wordSpacing",
        "textIndent", "tabSize"];

    function offsetFromMirror(textarea, x, y) {
        const text = textarea.value;
        const rect = textarea.getBoundingClientRect();
        const style = getComputedStyle(textarea);
        const mirror = document.createElement("div");
        MIRRORED.forEach(name => {
            mirror.style[name] = style[name];
        });
        Object.assign(mirror.style, {position: "fixed", left: `${rect.left}px`, top: `${rect.top}px`,
            visibility: "hidden", overflow: "hidden", whiteSpace: "pre-wrap", overflowWrap: "break-word"});
        const node = document.createTextNode(text + "\u200b");
        mirror.appendChild(node);
        document.body.appendChild(mirror);
        mirror.scrollTop = textarea.scrollTop;
        let best = text.length;
        let bestDistance = Infinity;
        const range = document.createRange();
        try {
            for (let i = 0; i < text.length; i++) {
                range.setStart(node, i);
                range.setEnd(node, i + 1);
                const box = range.getClientRects()[0];
                if (!box) continue;
                const dy = y < box.top ? box.top - y : (y > box.bottom ? y - box.bottom : 0);
                const middle = box.left + box.width / 2;
                const dx = Math.abs(x - middle);
                const distance = dy * 10000 + dx;
                if (distance < bestDistance) {
                    bestDistance = distance;
                    best = x < middle ? i : i + 1;
                }
            }
        } finally {
            mirror.remove();
        }
        return best;
    }

    function addToPrompt(prompt, text, separator) {
        if (prompt === "") return text;
        if (separator.trim() === "" && /\s$/.test(prompt)) return prompt + text;
        return prompt + separator + text;
    }

    // The toggle: remove if present, else append. Returns the new prompt.
    function togglePrompt(prompt, text, separator) {
        if (!text) return prompt;
        const removed = removeFromPrompt(prompt, text, separator);
        return removed !== null ? removed : addToPrompt(prompt, text, separator);
    }

    function isInPrompt(prompt, text) {
        if (!text) return false;
        const matcher = matcherFor(text);
        return matcher.regex.test(prompt);
    }

    window.extraNetworksPrompt = {
        textFromParts: textFromParts,
        removeFromPrompt: removeFromPrompt,
        insertAtOffset: insertAtOffset,
        snapOffset: snapOffset,
        offsetFromPoint: offsetFromPoint,
        offsetFromMirror: offsetFromMirror,
        addToPrompt: addToPrompt,
        togglePrompt: togglePrompt,
        isInPrompt: isInPrompt,
        escapeRegExp: escapeRegExp,
    };
})();
