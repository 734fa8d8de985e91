// Small DOM helpers the card panes share: elements and icons, natural-order comparison, per-pane preferences,
// the sanitiser for descriptions marked as HTML, and a clipboard fallback. Loaded before extraNetworks.js.
(function() {
    "use strict";

    const collator = new Intl.Collator(undefined, {numeric: true, sensitivity: "base"});

    function asNumber(value) {
        if (typeof value === "number") return value;
        if (typeof value !== "string" || value.trim() === "") return NaN;
        return Number(value);
    }

    // Numbers compare numerically, everything else as text in natural order ("a2" before "a10").
    function compareValues(a, b) {
        const na = asNumber(a);
        const nb = asNumber(b);
        if (!isNaN(na) && !isNaN(nb)) return na - nb;
        return collator.compare(a === undefined || a === null ? "" : String(a), b === undefined || b === null ? "" : String(b));
    }

    // Small stroke icons (emoji are missing from many system fonts).
    const iconPaths = {
        copy: ["M8 8h11v12H8z", "M5 16V4h11"],
        info: ["M12 3a9 9 0 1 0 0 18a9 9 0 1 0 0-18z", "M12 11v6", "M12 7.5v.5"],
        edit: ["M4 20l4-1 11-11-3-3L5 16z", "M14 6l3 3"],
    };

    function icon(name) {
        const ns = "http://www.w3.org/2000/svg";
        const svg = document.createElementNS(ns, "svg");
        svg.setAttribute("viewBox", "0 0 24 24");
        svg.setAttribute("aria-hidden", "true");
        svg.classList.add("card-icon");
        iconPaths[name].forEach(d => {
            const path = document.createElementNS(ns, "path");
            path.setAttribute("d", d);
            svg.appendChild(path);
        });
        return svg;
    }

    function iconButton(className, name, title) {
        const button = el("button", `${className} card-button`);
        button.type = "button";
        button.title = title;
        button.setAttribute("aria-label", title);
        button.appendChild(icon(name));
        return button;
    }

    function el(tag, className, text) {
        const node = document.createElement(tag);
        if (className) node.className = className;
        if (text !== undefined && text !== null) node.textContent = text;
        return node;
    }

    // Per-pane preferences kept across reloads (sort order, "show all"); a failing localStorage is ignored.
    function readPreference(key) {
        try {
            const text = window.localStorage.getItem(key);
            return text === null ? null : JSON.parse(text);
        } catch (e) {
            return null;
        }
    }

    function writePreference(key, value) {
        try {
            window.localStorage.setItem(key, JSON.stringify(value));
        } catch (e) {
            // private mode or full storage: the preference lasts until the page reloads
        }
    }

    // Descriptions marked as HTML (option extra_networks_card_description_is_html) are parsed in an inert
    // document (no script runs, no image loads) and only harmless tags survive, without attributes except a
    // plain link's href.
    const SAFE_TAGS = new Set(["A", "B", "BLOCKQUOTE", "BR", "CODE", "DIV", "EM", "H1", "H2", "H3", "H4", "H5",
        "H6", "HR", "I", "LI", "OL", "P", "PRE", "S", "SMALL", "SPAN", "STRONG", "SUB", "SUP", "U", "UL"]);
    const DROP_TAGS = new Set(["SCRIPT", "STYLE", "TEMPLATE", "IFRAME", "OBJECT", "EMBED", "SVG", "MATH", "NOSCRIPT",
        "TITLE", "TEXTAREA", "SELECT", "FORM", "INPUT", "BUTTON", "LINK", "META", "BASE"]);

    function parseInert(html) {
        return new DOMParser().parseFromString(`<!doctype html><body>${html}`, "text/html").body;
    }

    function sanitizeInto(source, target) {
        Array.from(source.childNodes).forEach(node => {
            if (node.nodeType === Node.TEXT_NODE) {
                target.appendChild(document.createTextNode(node.nodeValue));
                return;
            }
            if (node.nodeType !== Node.ELEMENT_NODE) return;
            const tag = node.tagName.toUpperCase();
            if (DROP_TAGS.has(tag)) return;
            if (!SAFE_TAGS.has(tag)) {
                sanitizeInto(node, target); // unknown element: keep its text and safe children
                return;
            }
            const copy = document.createElement(tag.toLowerCase());
            if (tag === "A") {
                const href = node.getAttribute("href") || "";
                if (/^(https?:|\.?\/|#)/i.test(href.trim())) {
                    copy.setAttribute("href", href.trim());
                    copy.setAttribute("target", "_blank");
                    copy.setAttribute("rel", "noopener noreferrer");
                }
            }
            sanitizeInto(node, copy);
            target.appendChild(copy);
        });
        return target;
    }

    function safeHtmlFragment(html) {
        return sanitizeInto(parseInert(html), document.createDocumentFragment());
    }

    function copyText(text) {
        const area = document.createElement("textarea");
        area.value = text;
        area.style.position = "fixed";
        area.style.opacity = "0";
        document.body.appendChild(area);
        area.select();
        try {
            document.execCommand("copy");
        } finally {
            area.remove();
        }
    }

    // A class's methods added to another class (a pane's tree and drop handling live in their own files).
    function addMethods(target, source) {
        Object.getOwnPropertyNames(source.prototype).filter(name => name !== "constructor").forEach(name => {
            Object.defineProperty(target.prototype, name, Object.getOwnPropertyDescriptor(source.prototype, name));
        });
    }

    window.cardsDom = {el, icon, iconButton, compareValues, readPreference, writePreference, safeHtmlFragment,
        copyText, addMethods, parseInert};
})();
