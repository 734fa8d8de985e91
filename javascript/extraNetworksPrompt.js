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

    // Removes every occurrence of `text` (see matcherFor) with the suffix that follows it and the separator
    // before it; returns null when nothing was found.
    function removeFromPrompt(prompt, text, separator) {
        const matcher = matcherFor(text);
        const found = Array.from(prompt.matchAll(matcher.regex));
        if (found.length === 0) return null;
        let result = prompt;
        for (let i = found.length - 1; i >= 0; i--) {
            let start = found[i].index;
            let end = start + found[i][0].length;
            if (matcher.suffix && result.startsWith(matcher.suffix, end)) end += matcher.suffix.length;
            if (separator && start >= separator.length && result.slice(start - separator.length, start) === separator) {
                start -= separator.length;
            } else if (separator && start === 0 && result.startsWith(separator, end)) {
                end += separator.length;
            }
            result = result.slice(0, start) + result.slice(end);
        }
        return result;
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
        addToPrompt: addToPrompt,
        togglePrompt: togglePrompt,
        isInPrompt: isInPrompt,
        escapeRegExp: escapeRegExp,
    };
})();
