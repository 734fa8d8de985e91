// The card editor dialog (the card's tool button): fields described by /sd_extra_networks/user-metadata,
// saved back to the card's sidecar JSON. Everything is built with DOM calls and textContent.
(function() {
    "use strict";

    function el(tag, className, text) {
        const node = document.createElement(tag);
        if (className) node.className = className;
        if (text !== undefined && text !== null) node.textContent = text;
        return node;
    }

    function query(pane, name) {
        return `page=${encodeURIComponent(pane.page)}&tabname=${encodeURIComponent(pane.tabname)}` +
            `&name=${encodeURIComponent(name)}`;
    }

    function fieldElement(field, inputs) {
        const wrap = el("label", "editor-field");
        wrap.appendChild(el("span", "editor-label", field.label));
        let input;
        if (field.type === "textarea") {
            input = el("textarea", "editor-input");
            input.rows = field.lines || 3;
            input.value = field.value || "";
        } else if (field.type === "select") {
            input = el("select", "editor-input");
            (field.choices || []).forEach(choice => {
                const option = el("option", null, choice);
                option.value = choice;
                input.appendChild(option);
            });
            input.value = field.value;
        } else if (field.type === "slider") {
            const row = el("span", "editor-slider");
            const range = el("input", "editor-range");
            range.type = "range";
            input = el("input", "editor-input editor-number");
            input.type = "number";
            [range, input].forEach(x => {
                x.min = field.min;
                x.max = field.max;
                x.step = field.step;
                x.value = field.value;
            });
            range.addEventListener("input", () => {
                input.value = range.value;
            });
            input.addEventListener("input", () => {
                range.value = input.value;
            });
            row.appendChild(range);
            row.appendChild(input);
            wrap.appendChild(row);
        } else {
            input = el("input", "editor-input");
            input.type = "text";
            input.value = field.value || "";
        }
        input.dataset.key = field.key;
        if (field.type !== "slider") wrap.appendChild(input);
        if (field.info) wrap.appendChild(el("span", "editor-info", field.info));
        inputs[field.key] = input;
        return wrap;
    }

    // Clicking a training tag adds it to (or removes it from) the comma-separated target field.
    function toggleTag(input, tag) {
        const parts = input.value.split(/ *, */).filter(x => x !== "");
        const at = parts.indexOf(tag);
        if (at >= 0) parts.splice(at, 1);
        else parts.push(tag);
        input.value = parts.join(", ");
    }

    // A1111's random prompt: each tag with probability count / max count, brackets escaped, sorted.
    function randomPrompt(tags) {
        const max = tags.length ? tags[0][1] : 0;
        const picked = [];
        tags.forEach(([tag, count]) => {
            if (count > Math.random() * max) picked.push(tag.replace(/([({[\]})])/g, "\\$1"));
        });
        return picked.sort().join(", ");
    }

    function selectedGalleryImage(tabname) {
        const app = window.gradioApp();
        const gallery = app.querySelector(`#${tabname}_gallery`);
        if (!gallery) return null;
        return gallery.querySelector(".preview img, button.selected img, .thumbnail-item.selected img") ||
            gallery.querySelector("img");
    }

    function build(pane, item, data) {
        const inputs = {};
        const root = el("div", "extra-network-editor");
        const status = el("div", "editor-status");
        const top = el("div", "editor-top");
        const left = el("div", "editor-left");
        const right = el("div", "editor-right");
        const fields = data.fields || [];
        if (fields.length) left.appendChild(fieldElement(fields[0], inputs));
        const table = el("table", "editor-table");
        (data.table || []).forEach(row => {
            const tr = table.insertRow();
            tr.appendChild(el("th", null, row[0]));
            const td = el("td", null, row[1]);
            if (row[2]) td.title = row[2];
            tr.appendChild(td);
        });
        left.appendChild(table);
        const preview = el("div", "editor-preview");
        if (data.preview) {
            const img = el("img");
            img.src = data.preview;
            img.alt = "";
            preview.appendChild(img);
        } else {
            preview.appendChild(el("span", "editor-no-preview", "No preview"));
        }
        right.appendChild(preview);
        top.appendChild(left);
        top.appendChild(right);
        root.appendChild(top);

        const rest = fields.slice(1);
        const target = data.tags_target;
        rest.forEach(field => {
            if (field.key === target && (data.tags || []).length) {
                const tags = el("div", "editor-tags");
                tags.appendChild(el("span", "editor-label", "Training dataset tags"));
                const list = el("div", "editor-tag-list");
                data.tags.forEach(([tag, count]) => {
                    const button = el("button", "editor-tag");
                    button.type = "button";
                    button.appendChild(el("span", "editor-tag-name", tag));
                    button.appendChild(el("span", "editor-tag-count", String(count)));
                    button.addEventListener("click", () => toggleTag(inputs[target], tag));
                    list.appendChild(button);
                });
                tags.appendChild(list);
                root.appendChild(tags);
            }
            root.appendChild(fieldElement(field, inputs));
        });
        if ((data.random_prompt_tags || []).length) {
            const wrap = el("div", "editor-field");
            wrap.appendChild(el("span", "editor-label", "Random prompt"));
            const row = el("div", "editor-random");
            const text = el("textarea", "editor-input");
            text.rows = 3;
            text.readOnly = true;
            const generate = el("button", "editor-button", "Generate");
            generate.type = "button";
            generate.addEventListener("click", () => {
                text.value = randomPrompt(data.random_prompt_tags);
            });
            row.appendChild(text);
            row.appendChild(generate);
            wrap.appendChild(row);
            root.insertBefore(wrap, root.lastChild);
        }

        const buttons = el("div", "editor-buttons");
        const cancel = el("button", "editor-button", "Cancel");
        cancel.type = "button";
        cancel.addEventListener("click", () => window.extraNetworksPopup.close());
        buttons.appendChild(cancel);
        if (data.can_replace_preview) {
            const replace = el("button", "editor-button", "Replace preview");
            replace.type = "button";
            replace.title = "Use the selected image of the gallery as this card's preview";
            replace.addEventListener("click", () => replacePreview(pane, item, status, preview));
            buttons.appendChild(replace);
        }
        const save = el("button", "editor-button editor-button--primary", "Save");
        save.type = "button";
        save.addEventListener("click", () => saveValues(pane, item, inputs, status));
        buttons.appendChild(save);
        root.appendChild(status);
        root.appendChild(buttons);
        return root;
    }

    function saveValues(pane, item, inputs, status) {
        const values = {};
        Object.keys(inputs).forEach(key => {
            const input = inputs[key];
            values[key] = input.type === "number" ? Number(input.value) : input.value;
        });
        status.textContent = "Saving...";
        fetch(`./sd_extra_networks/user-metadata?${query(pane, item.name)}`, {
            method: "POST",
            headers: {"Content-Type": "application/json", "X-Webui-Request": "1"},
            body: JSON.stringify(values),
        }).then(r => r.json().then(body => ({ok: r.ok, body: body}))).then(({ok, body}) => {
            if (!ok) {
                status.textContent = body.error || "Could not save.";
                return;
            }
            window.extraNetworksPopup.close();
            pane.refreshSingleCard(item.name);
        }).catch(error => {
            status.textContent = `Could not save: ${error.message}`;
        });
    }

    function replacePreview(pane, item, status, preview) {
        const img = selectedGalleryImage(pane.tabname);
        if (!img) {
            status.textContent = "Generate an image first: the selected gallery image becomes the preview.";
            return;
        }
        status.textContent = "Saving the preview...";
        fetch(img.src).then(r => r.blob()).then(blob => fetch(
            `./sd_extra_networks/replace-preview?${query(pane, item.name)}`,
            {method: "POST", body: blob, headers: {"X-Webui-Request": "1"}},
        )).then(r => r.json().then(body => ({ok: r.ok, body: body}))).then(({ok, body}) => {
            if (!ok) {
                status.textContent = body.error || "Could not save the preview.";
                return;
            }
            status.textContent = "Preview replaced.";
            const shown = el("img");
            shown.src = img.src;
            shown.alt = "";
            preview.replaceChildren(shown);
            pane.refreshSingleCard(item.name);
        }).catch(error => {
            status.textContent = `Could not save the preview: ${error.message}`;
        });
    }

    function open(pane, item) {
        fetch(`./sd_extra_networks/user-metadata?${query(pane, item.name)}`, {cache: "no-store"})
            .then(r => r.json().then(body => ({ok: r.ok, body: body})))
            .then(({ok, body}) => {
                if (!ok) throw new Error(body.error || "HTTP error");
                window.extraNetworksPopup.show(build(pane, item, body), body.title || item.title);
            })
            .catch(error => console.error("opening the editor failed", error));
    }

    window.extraNetworksEditor = {open: open, toggleTag: toggleTag, randomPrompt: randomPrompt};
})();
