// A modal popup for extra-network panes (metadata table, editor), closed by its button, Escape or a click outside.
(function() {
    "use strict";

    let overlay = null;

    function close() {
        if (overlay) {
            overlay.remove();
            overlay = null;
        }
    }

    function show(content, title) {
        close();
        overlay = document.createElement("div");
        overlay.className = "global-popup";
        overlay.addEventListener("click", event => {
            if (event.target === overlay) close();
        });
        const box = document.createElement("div");
        box.className = "global-popup-inner";
        box.setAttribute("role", "dialog");
        box.setAttribute("aria-modal", "true");
        const header = document.createElement("div");
        header.className = "global-popup-header";
        const heading = document.createElement("h3");
        heading.textContent = title || "";
        const closeButton = document.createElement("button");
        closeButton.type = "button";
        closeButton.className = "global-popup-close";
        closeButton.title = "Close";
        closeButton.textContent = "\u00D7";
        closeButton.addEventListener("click", close);
        header.appendChild(heading);
        header.appendChild(closeButton);
        box.appendChild(header);
        const body = document.createElement("div");
        body.className = "global-popup-body";
        body.appendChild(content);
        box.appendChild(body);
        overlay.appendChild(box);
        document.body.appendChild(overlay);
        closeButton.focus();
        return box;
    }

    // `modelspec.a.b: v` becomes {modelspec: {a: {b: v}}}, so related keys are shown together; `ss_*` keys stay
    // flat, their JSON values become nested tables; cover images never reach the page (the server drops them).
    // The keys come from the file: every object built here has no prototype and is only read through own
    // properties, so `modelspec.__proto__.x` or `constructor.prototype` is a plain key, shown as such, and never
    // reaches Object.prototype (which every card of the page reads through).
    function nestDottedKeys(metadata) {
        const result = Object.create(null);
        const own = (node, key) => Object.prototype.hasOwnProperty.call(node, key) ? node[key] : undefined;
        Object.keys(metadata).forEach(key => {
            const value = metadata[key];
            if (!key.startsWith("modelspec.")) {
                result[key] = value;
                return;
            }
            let node = result;
            const parts = key.split(".");
            parts.slice(0, -1).forEach(part => {
                const next = own(node, part);
                if (typeof next !== "object" || next === null || Array.isArray(next)) node[part] = Object.create(null);
                else if (Object.getPrototypeOf(next) !== null) node[part] = Object.assign(Object.create(null), next);
                node = node[part];
            });
            node[parts[parts.length - 1]] = value;
        });
        return result;
    }

    // Trainers store structures as JSON text (ss_tag_frequency, ss_network_args, ...): shown as tables.
    function parseJsonText(value) {
        if (typeof value !== "string" || !/^\s*[[{]/.test(value)) return value;
        try {
            return JSON.parse(value);
        } catch (e) {
            return value;
        }
    }

    function metadataTable(metadata, nested) {
        const table = document.createElement("table");
        table.className = "popup-metadata";
        const data = nested ? metadata : nestDottedKeys(metadata);
        Object.keys(data).forEach(key => {
            const row = table.insertRow();
            const th = document.createElement("th");
            th.textContent = key;
            row.appendChild(th);
            const td = row.insertCell();
            const value = parseJsonText(data[key]);
            if (value && typeof value === "object" && !Array.isArray(value)) {
                td.appendChild(metadataTable(value, true));
            } else {
                td.textContent = typeof value === "string" ? value : JSON.stringify(value);
            }
        });
        return table;
    }

    document.addEventListener("keydown", event => {
        if (event.key === "Escape" && overlay) close();
    });

    window.extraNetworksPopup = {show: show, close: close, metadataTable: metadataTable};
})();
