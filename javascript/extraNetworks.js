// Extra-network card panes (Lora, ...): card data comes as JSON from /sd_extra_networks/cards and only the
// cards in view are in the DOM (a windowed grid), so search and scroll stay fast with thousands of cards.
// All strings go through textContent / attributes; event handlers are delegated and installed once.
// This file: the pane's data, search, sort, grid, card clicks and polling. Next door: cardsDom.js (DOM helpers,
// loaded first), extraNetworksTree.js (folder buttons and tree), extraNetworksDrag.js (drag into a prompt),
// extraNetworksEditor.js, extraNetworksPopup.js, extraNetworksPrompt.js (prompt text edits).
(function() {
    "use strict";

    const panes = new Map(); // pane element id -> ExtraNetworksPane
    const OVERSCAN_ROWS = 2;
    const CARD_CACHE_LIMIT = 600;
    const POLL_IDLE_MS = 3000; // background status (hashing progress, loaded model) while the pane is in view
    const POLL_BUSY_MS = 500;
    const sortKeyForOption = {"Path": "default", "Name": "name", "Date Created": "date_created",
        "Date Modified": "date_modified"};

    const {el, iconButton, compareValues, readPreference, writePreference, safeHtmlFragment, copyText, parseInert} =
        window.cardsDom;

    function rem() {
        return parseFloat(getComputedStyle(document.documentElement).fontSize) || 16;
    }

    class ExtraNetworksPane {
        constructor(root) {
            this.root = root;
            this.tabname = root.dataset.tabname;
            this.page = root.dataset.page;
            this.search = root.querySelector(".extra-network-search");
            this.scroller = root.querySelector(".extra-network-cards-scroll");
            this.sizer = root.querySelector(".extra-network-cards-sizer");
            this.win = root.querySelector(".extra-network-cards-window");
            this.message = root.querySelector(".extra-network-message");
            this.count = root.querySelector(".extra-network-count");
            this.otherToggle = el("button", "extra-network-control--other-models");
            this.otherToggle.type = "button";
            this.otherToggle.hidden = true;
            this.count.after(this.otherToggle);
            this.showOtherModels = !!readPreference(this.preferenceKey("show-all"));
            this.dirs = root.querySelector(".extra-network-dirs");
            this.items = [];
            this.sorted = [];
            this.view = [];
            this.opts = {};
            this.roots = [];
            this.sortKey = null;
            this.sortDir = null;
            this.cardCache = new Map();
            this.lastRenderKey = "";
            this.viewVersion = 0;
            this.loading = null;
            this.treeState = {expanded: new Set(), selected: null};
            this.dirsInitialised = false;
            this.wasVisible = false;
            this.resizeObserver = new ResizeObserver(() => {
                // Coming into view (tab selected): revalidate, which costs a 304 when nothing changed.
                const visible = this.scroller.clientWidth > 0;
                if (visible && !this.wasVisible && this.items.length) this.load(false);
                this.wasVisible = visible;
                this.render(false);
            });
            this.resizeObserver.observe(this.scroller);
            this.progress = el("span", "extra-network-progress");
            this.progress.setAttribute("aria-live", "polite");
            this.progress.hidden = true;
            this.otherToggle.after(this.progress);
            this.background = null;
            this.pollTimer = null;
            this.loadedAt = null;
        }

        preferenceKey(name) {
            return `extra-networks:${this.root.id}:${name}`;
        }

        url(path) {
            return `./sd_extra_networks/${path}?page=${encodeURIComponent(this.page)}` +
                `&tabname=${encodeURIComponent(this.tabname)}`;
        }

        // Fetches the card data (refresh: rescan the folders first). Concurrent calls share one request. A plain
        // load revalidates with the server's etag, so an unchanged listing costs a 304 and no re-parsing.
        load(refresh) {
            if (this.loading && !refresh) return this.loading;
            // The refresh POST sends the etag too: a rescan that changed nothing answers 304.
            const headers = refresh && this.etag ? {"If-None-Match": this.etag} : {};
            const request = refresh ?
                fetch(this.url("refresh"), {method: "POST", headers: headers}) :
                fetch(this.url("cards"), {cache: "no-cache"});
            this.loading = request
                .then(response => {
                    if (!response.ok && response.status !== 304) throw new Error(`HTTP ${response.status}`);
                    const family = response.headers.get("X-Model-Family") || "";
                    const etag = response.headers.get("ETag");
                    if (response.status === 304 || (etag && etag === this.etag)) {
                        this.setModelFamily(family);
                        return null;
                    }
                    return response.json().then(data => {
                        this.etag = etag;
                        this.modelFamily = family;
                        this.setData(data);
                        if (this.loadedAt === null) this.loadedAt = performance.now();
                    });
                })
                .catch(error => {
                    console.error("loading cards failed", error);
                    this.showMessage(`Could not load the cards: ${error.message}`);
                })
                .finally(() => {
                    this.loading = null;
                });
            return this.loading;
        }

        setModelFamily(family) {
            if (family === this.modelFamily) return;
            this.modelFamily = family;
            this.applyFilter();
        }

        // Fills the fields the server leaves out when empty, and the lower-case text that search looks in.
        normalise(item, index) {
            item.index = index;
            item.title = item.title || item.name;
            item.alias = item.alias || "";
            item.description = item.description || "";
            item.activation = item.activation || "";
            item.negative = item.negative || [];
            item.prompt = item.prompt || [];
            item.terms = item.terms || [];
            item.sort = item.sort || {};
            item.rel = item.terms[0] || item.name;
            let description = item.description;
            if (description && this.opts.extra_networks_card_description_is_html) {
                description = parseInert(description).textContent;
            }
            item.searchText = [item.name, item.alias, item.title, ...item.terms, description, item.activation]
                .filter(Boolean).join("\n").toLowerCase();
            return item;
        }

        setData(data) {
            this.opts = data.opts || {};
            this.roots = data.roots || [];
            this.versionFilter = data.version_filter || null;
            this.items = (data.items || []).map((item, index) => this.normalise(item, index));
            this.lastMatch = null;
            if (this.sortKey === null) {
                // The last sort the user chose wins over the options' initial order (A1111 forgets it).
                const saved = readPreference(this.preferenceKey("sort"));
                const keys = Object.values(sortKeyForOption);
                if (saved && keys.includes(saved.key)) {
                    this.sortKey = saved.key;
                    this.sortDir = saved.dir === "Descending" ? "Descending" : "Ascending";
                } else {
                    this.sortKey = sortKeyForOption[this.opts.extra_networks_card_order_field] || "default";
                    this.sortDir = this.opts.extra_networks_card_order === "Descending" ? "Descending" : "Ascending";
                }
            }
            if (!this.dirsInitialised) {
                this.dirsInitialised = true;
                const showDirs = this.opts.extra_networks_tree_view_default_enabled !== false;
                this.root.classList.toggle("extra-network-dirs-hidden", !showDirs);
                const width = Number(this.opts.extra_networks_tree_view_default_width) || 180;
                this.root.style.setProperty("--tree-width", `${width}px`);
            }
            this.applyCardStyle();
            this.keepUnchangedCards();
            this.updateSortButtons();
            this.sortItems();
            this.buildDirs();
            this.applyFilter();
            this.schedulePoll(0);
        }

        filterActive() {
            const rule = this.versionFilter;
            return !!rule && !rule.show_all && !!this.modelFamily && this.modelFamily !== "Unknown";
        }

        // A1111's version rule, run here so a checkpoint switch re-filters without rebuilding the data.
        compatible(item) {
            const rule = this.versionFilter;
            const family = this.modelFamily;
            if (!rule || rule.show_all || !family || family === "Unknown") return true;
            const version = item.sd || "Unknown";
            if (version === "Unknown") return !(rule.hide_unknown_for || []).includes(family);
            return version === family || (item.sd_also || []).includes(family);
        }

        applyCardStyle() {
            const width = Number(this.opts.extra_networks_card_width) || 0;
            const height = Number(this.opts.extra_networks_card_height) || 0;
            const scale = Number(this.opts.extra_networks_card_text_scale) || 1;
            this.root.style.setProperty("--card-width", width > 0 ? `${width}px` : "11rem");
            this.root.style.setProperty("--card-height", height > 0 ? `${height}px` : "15rem");
            this.root.style.setProperty("--card-font-scale", String(scale));
            this.cardWidth = width > 0 ? width : 11 * rem();
            this.cardHeight = height > 0 ? height : 15 * rem();
            this.gap = 0.5 * rem();
        }

        // --- filter and sort ---------------------------------------------------------------------------------------
        sortItems() {
            const key = this.sortKey;
            const dir = this.sortDir === "Descending" ? -1 : 1;
            const indices = this.items.map(item => item.index);
            // "default" (Path) is the server's listing order: natural-sorted folders, then files.
            const value = key === "default" ? (item => item.index) : (item => item.sort[key]);
            indices.sort((a, b) => {
                const ia = this.items[a];
                const ib = this.items[b];
                const result = compareValues(value(ia), value(ib));
                return result !== 0 ? dir * result : ia.index - ib.index;
            });
            this.sorted = indices;
        }

        // Typing narrows the last matches instead of scanning every card again: a query that extends the last
        // one can only match a subset of what that one matched (same sort, hidden-folder threshold passed).
        matchQuery(query) {
            const longEnough = query.length >= 4;
            const last = this.lastMatch;
            const narrowing = last && last.sorted === this.sorted && query.startsWith(last.query) &&
                (last.query.length >= 4 || !longEnough);
            const source = narrowing ? last.indices : this.sorted;
            const indices = query === "" && !narrowing ? source.filter(index => !this.items[index].search_only) :
                source.filter(index => {
                    const item = this.items[index];
                    if (item.search_only && !longEnough) return false;
                    return item.searchText.includes(query);
                });
            this.lastMatch = {query: query, sorted: this.sorted, indices: indices};
            return indices;
        }

        applyFilter() {
            const query = (this.search.value || "").toLowerCase().trim();
            let otherModels = 0;
            this.view = this.matchQuery(query).filter(index => {
                const item = this.items[index];
                item.otherModel = !this.compatible(item);
                if (item.otherModel) {
                    otherModels++;
                    return this.showOtherModels;
                }
                return true;
            });
            this.viewVersion++;
            const shown = query || (otherModels && !this.showOtherModels) ?
                `${this.view.length} of ${this.items.length}` : `${this.items.length}`;
            this.count.textContent = this.items.length ? shown : "";
            // Cards for another model family are hidden, not gone: the toggle shows them greyed out (A1111 13A-10).
            // It stays in view whenever the filter is on, so it is clear why cards are missing.
            this.otherToggle.hidden = !this.filterActive();
            this.otherToggle.textContent = this.showOtherModels ?
                `Hide other models (${otherModels})` : `Show all (+${otherModels} for other models)`;
            this.otherToggle.setAttribute("aria-pressed", this.showOtherModels ? "true" : "false");
            this.otherToggle.title = `Showing cards for ${this.modelFamily}; ${otherModels} are for other model ` +
                "families (setting: Always show all networks on the Lora page)";
            if (this.items.length === 0) {
                this.showEmpty();
            } else if (this.view.length === 0) {
                this.showMessage(`Nothing matches "${this.search.value}".`);
            } else {
                this.showMessage(null);
            }
            this.scroller.scrollTop = 0;
            this.render(true);
            this.updateTreeSelection();
        }

        showEmpty() {
            this.message.replaceChildren();
            this.message.hidden = false;
            this.message.appendChild(el("div", null, "Nothing here. Add some content to the following directories:"));
            const list = el("ul", "extra-network-empty-dirs");
            this.roots.forEach(r => list.appendChild(el("li", null, r.path)));
            this.message.appendChild(list);
        }

        showMessage(text) {
            this.message.hidden = !text;
            this.message.textContent = text || "";
        }

        setSort(key) {
            this.sortKey = key;
            writePreference(this.preferenceKey("sort"), {key: this.sortKey, dir: this.sortDir});
            this.updateSortButtons();
            this.sortItems();
            this.applyFilter();
        }

        toggleSortDir() {
            this.sortDir = this.sortDir === "Descending" ? "Ascending" : "Descending";
            writePreference(this.preferenceKey("sort"), {key: this.sortKey, dir: this.sortDir});
            this.updateSortButtons();
            this.sortItems();
            this.applyFilter();
        }

        updateSortButtons() {
            this.root.querySelectorAll(".extra-network-control--sort").forEach(button => {
                const active = button.dataset.sortKey === this.sortKey;
                button.classList.toggle("extra-network-control--enabled", active);
                button.setAttribute("aria-pressed", active ? "true" : "false");
            });
            const dirButton = this.root.querySelector(".extra-network-control--sort-dir");
            if (dirButton) {
                const descending = this.sortDir === "Descending";
                dirButton.dataset.sortdir = this.sortDir || "Ascending";
                dirButton.textContent = descending ? "\u2193" : "\u2191";
                dirButton.title = descending ? "Sort descending" : "Sort ascending";
            }
        }

        setSearch(text) {
            this.search.value = text;
            this.applyFilter();
        }

        // --- windowed grid -----------------------------------------------------------------------------------------
        render(force) {
            const width = this.scroller.clientWidth;
            if (!width || !this.cardWidth) return; // hidden tab: the ResizeObserver calls again when shown
            const gap = this.gap;
            const columns = Math.max(1, Math.floor((width + gap) / (this.cardWidth + gap)));
            const rowHeight = this.cardHeight + gap;
            const rows = Math.ceil(this.view.length / columns);
            const top = this.scroller.scrollTop;
            const first = Math.max(0, Math.floor(top / rowHeight) - OVERSCAN_ROWS);
            const last = Math.min(rows - 1, Math.ceil((top + this.scroller.clientHeight) / rowHeight) + OVERSCAN_ROWS);
            const key = `${columns}:${first}:${last}:${this.viewVersion}`;
            if (!force && key === this.lastRenderKey) return;
            this.lastRenderKey = key;
            this.sizer.style.height = `${rows * rowHeight}px`;
            this.win.style.transform = `translateY(${first * rowHeight}px)`;
            // Cards stretch a little so the columns fill the pane's width.
            this.win.style.gridTemplateColumns = `repeat(${columns}, minmax(0, 1fr))`;
            this.win.style.gap = `${gap}px`;
            const fragment = document.createDocumentFragment();
            const end = Math.min(this.view.length, (last + 1) * columns);
            for (let i = first * columns; i < end; i++) {
                const card = this.cardElement(this.view[i]);
                card.classList.toggle("card-other-model", !!this.items[this.view[i]].otherModel);
                fragment.appendChild(card);
            }
            this.win.replaceChildren(fragment);
            this.markActiveCards();
        }

        // New data (a rescan, new hashes): card elements whose content is the same are kept, so a card under
        // the mouse keeps its hover state and nothing flickers.
        keepUnchangedCards() {
            const byName = new Map();
            this.items.forEach(item => byName.set(item.name, item));
            const kept = new Map();
            this.cardCache.forEach(card => {
                const item = byName.get(card.dataset.name);
                if (item && card.cardSignature === this.cardSignature(item)) {
                    card.dataset.index = String(item.index);
                    kept.set(item.index, card);
                }
            });
            this.cardCache = kept;
        }

        cardSignature(item) {
            return JSON.stringify([item.title, item.preview, item.description, item.sd, item.error, item.meta,
                item.filename, this.opts.extra_networks_card_show_desc, this.opts.extra_networks_card_description_is_html]);
        }

        cardElement(index) {
            let card = this.cardCache.get(index);
            if (card) return card;
            if (this.cardCache.size > CARD_CACHE_LIMIT) this.cardCache.clear();
            card = this.buildCard(this.items[index]);
            card.cardSignature = this.cardSignature(this.items[index]);
            this.cardCache.set(index, card);
            return card;
        }

        buildCard(item) {
            const card = el("div", "card");
            card.tabIndex = 0;
            card.draggable = true; // drag it into a prompt: it lands where it is dropped
            card.setAttribute("role", "button");
            card.dataset.index = String(item.index);
            card.dataset.name = item.name;
            card.title = item.error ? `${item.title}\n${item.error}` : item.title;
            if (item.error) card.classList.add("card-has-error");
            if (item.preview) {
                const img = el("img", "preview");
                img.loading = "lazy";
                img.decoding = "async";
                img.alt = "";
                img.src = item.preview;
                img.addEventListener("error", () => img.remove(), {once: true});
                card.appendChild(img);
            } else {
                card.classList.add("no-preview");
            }
            // The copy/metadata/edit buttons show on hover or focus only, so they are made then (addButtons):
            // half the nodes per card, and a search keystroke builds a new screenful of cards.
            if (item.sd && item.sd !== "Unknown") card.appendChild(el("span", "card-badge", item.sd));
            const actions = el("div", "actions");
            actions.appendChild(el("div", "name", item.title));
            if (item.error) actions.appendChild(el("div", "card-error", item.error));
            if (item.description && this.opts.extra_networks_card_show_desc !== false) {
                const description = el("div", "description");
                if (this.opts.extra_networks_card_description_is_html) {
                    description.appendChild(safeHtmlFragment(item.description));
                } else {
                    description.textContent = item.description;
                }
                actions.appendChild(description);
            }
            card.appendChild(actions);
            return card;
        }

        addButtons(card) {
            if (card.querySelector(":scope > .button-row")) return;
            const item = this.items[Number(card.dataset.index)];
            if (!item) return;
            const buttons = el("div", "button-row");
            buttons.appendChild(iconButton("copy-path-button", "copy", "Copy path to clipboard"));
            if (item.meta) buttons.appendChild(iconButton("metadata-button", "info", "Show internal metadata"));
            if (window.extraNetworksEditor && item.filename) {
                buttons.appendChild(iconButton("edit-button", "edit", "Edit metadata"));
            }
            card.insertBefore(buttons, card.firstChild);
        }

        // --- prompt insertion ----------------------------------------------------------------------------------------
        promptAreas() {
            const app = window.gradioApp();
            return {
                prompt: app.querySelector(`#${this.tabname}_prompt textarea`),
                negative: app.querySelector(`#${this.tabname}_neg_prompt textarea`),
            };
        }

        separator() {
            return this.opts.extra_networks_add_text_separator === undefined ?
                " " : String(this.opts.extra_networks_add_text_separator);
        }

        cardTexts(item) {
            const tools = window.extraNetworksPrompt;
            return {text: tools.textFromParts(item.prompt, this.opts), negative: tools.textFromParts(item.negative, this.opts)};
        }

        cardClicked(item) {
            const tools = window.extraNetworksPrompt;
            const {text, negative} = this.cardTexts(item);
            if (!text && !negative) return;
            const separator = this.separator();
            const areas = this.promptAreas();
            if (text && areas.prompt) {
                areas.prompt.value = tools.togglePrompt(areas.prompt.value, text, separator);
                window.updateInput(areas.prompt);
            }
            if (negative && areas.negative) {
                areas.negative.value = tools.togglePrompt(areas.negative.value, negative, separator);
                window.updateInput(areas.negative);
            }
            this.markActiveCards();
        }

        // Outlines the cards whose text is in the prompt now.
        markActiveCards() {
            const area = this.promptAreas().prompt;
            const prompt = area ? area.value : "";
            const tools = window.extraNetworksPrompt;
            this.win.querySelectorAll(".card").forEach(card => {
                const item = this.items[Number(card.dataset.index)];
                const active = !!item && prompt !== "" && tools.isInPrompt(prompt, tools.textFromParts(item.prompt, this.opts));
                card.classList.toggle("card-active", active);
            });
        }

        // --- background work and the loaded model --------------------------------------------------------------------
        // While the pane is in view it asks every few seconds (twice a second while work runs) what the server
        // does in the background (hashing new files) and which model family is loaded, so the version filter
        // follows a checkpoint switch made anywhere, and the cards pick up new hashes when hashing ends.
        schedulePoll(delay) {
            if (this.pollTimer !== null) return;
            this.pollTimer = setTimeout(() => {
                this.pollTimer = null;
                this.poll();
            }, delay);
        }

        visible() {
            return this.scroller.clientWidth > 0 && document.visibilityState !== "hidden";
        }

        poll() {
            if (!document.body.contains(this.root)) return; // the pane was replaced
            if (!this.visible() && !(this.background && this.background.running)) {
                this.schedulePoll(POLL_IDLE_MS);
                return;
            }
            fetch(`./sd_extra_networks/background-status?page=${encodeURIComponent(this.page)}`, {cache: "no-store"})
                .then(response => (response.ok ? response.json() : null))
                .then(data => {
                    if (!data) return;
                    this.showBackground(data.status);
                    if (data.model_family !== undefined) this.setModelFamily(data.model_family || "");
                })
                .catch(() => null)
                .finally(() => this.schedulePoll(this.background && this.background.running ? POLL_BUSY_MS : POLL_IDLE_MS));
        }

        showBackground(status) {
            const before = this.background;
            this.background = status || null;
            const running = !!(status && status.running);
            this.progress.hidden = !running;
            if (running) {
                const label = status.label || "Working";
                this.progress.textContent = `${label} ${status.done}/${status.total}`;
                this.progress.title = status.current ? `${label}: ${status.current}` : label;
                this.progress.style.setProperty("--progress", String(status.total ? status.done / status.total : 0));
            }
            // Work finished, or went on since the last look: the card data changed (hashes are searchable).
            if (before && status && before.generation !== status.generation && !running) this.load(false);
        }

        // --- buttons on a card ------------------------------------------------------------------------------------------
        copyPath(item) {
            const text = item.filename || "";
            if (navigator.clipboard && window.isSecureContext) {
                navigator.clipboard.writeText(text).catch(() => copyText(text));
            } else {
                copyText(text);
            }
        }

        showMetadata(item) {
            fetch(`./sd_extra_networks/metadata?page=${encodeURIComponent(this.page)}&item=${encodeURIComponent(item.name)}`)
                .then(response => response.json())
                .then(data => {
                    if (!data || !data.metadata) {
                        window.extraNetworksPopup.show(el("div", null, "This file has no metadata."), item.title);
                        return;
                    }
                    const parsed = JSON.parse(data.metadata);
                    window.extraNetworksPopup.show(window.extraNetworksPopup.metadataTable(parsed), item.title);
                })
                .catch(error => console.error("reading metadata failed", error));
        }

        // Re-reads one card (after its user metadata was edited) without rescanning the folders.
        refreshSingleCard(name) {
            const url = `./sd_extra_networks/get-single-card?page=${encodeURIComponent(this.page)}` +
                `&tabname=${encodeURIComponent(this.tabname)}&name=${encodeURIComponent(name)}`;
            return fetch(url, {cache: "no-store"}).then(r => r.json()).then(data => {
                const old = this.items.findIndex(item => item.name === name);
                if (old < 0 || !data.item) return;
                const item = this.normalise(data.item, old);
                this.items[old] = item;
                this.lastMatch = null;
                this.cardCache.delete(old);
                this.render(true);
            });
        }
    }

    // --- pane discovery ----------------------------------------------------------------------------------------------
    function paneFor(node) {
        const root = node && node.closest ? node.closest(".extra-network-pane") : null;
        if (!root) return null;
        let pane = panes.get(root.id);
        if (!pane || pane.root !== root) { // gradio re-rendered the HTML: start over with the new element
            pane = new ExtraNetworksPane(root);
            panes.set(root.id, pane);
        }
        return pane;
    }

    function discoverPanes() {
        window.gradioApp().querySelectorAll(".extra-network-pane").forEach(root => {
            const pane = paneFor(root);
            if (pane && pane.items.length === 0 && !pane.loading) pane.load(false);
        });
    }

    // --- delegated handlers, installed once ------------------------------------------------------------------------
    function onClick(event) {
        const target = event.target;
        const pane = paneFor(target);
        if (!pane) return;
        const button = target.closest("button");
        if (button && pane.root.contains(button)) {
            if (button.classList.contains("extra-network-control--sort")) return pane.setSort(button.dataset.sortKey);
            if (button.classList.contains("extra-network-control--sort-dir")) return pane.toggleSortDir();
            if (button.classList.contains("extra-network-control--tree")) {
                pane.root.classList.toggle("extra-network-dirs-hidden");
                return pane.render(true);
            }
            if (button.classList.contains("extra-network-control--refresh")) return refreshPane(pane);
            if (button.classList.contains("extra-network-control--other-models")) {
                pane.showOtherModels = !pane.showOtherModels;
                writePreference(pane.preferenceKey("show-all"), pane.showOtherModels);
                return pane.applyFilter();
            }
            if (button.classList.contains("extra-network-dir-button")) return pane.setSearch(button.dataset.search);
        }
        const treeRow = target.closest(".tree-list-content");
        if (treeRow) {
            if (treeRow.classList.contains("tree-list-content-dir")) {
                return pane.treeDirClicked(treeRow, !!target.closest(".tree-list-item-action--chevron"));
            }
            const item = pane.items[Number(treeRow.dataset.index)];
            if (item) pane.cardClicked(item);
            return;
        }
        const card = target.closest(".card");
        if (!card) return;
        const item = pane.items[Number(card.dataset.index)];
        if (!item) return;
        event.preventDefault();
        event.stopPropagation();
        if (button && button.classList.contains("copy-path-button")) return pane.copyPath(item);
        if (button && button.classList.contains("metadata-button")) return pane.showMetadata(item);
        if (button && button.classList.contains("edit-button")) {
            return window.extraNetworksEditor.open(pane, item);
        }
        pane.cardClicked(item);
    }

    function refreshPane(pane) {
        // The server rescans every page; reload the others so they show the same listing.
        pane.load(true).then(() => panes.forEach(other => {
            if (other !== pane) other.load(false);
        }));
    }

    function onInput(event) {
        const target = event.target;
        if (target.classList && target.classList.contains("extra-network-search")) {
            const pane = paneFor(target);
            if (pane) {
                pane.treeState.selected = null;
                pane.applyFilter();
            }
            return;
        }
        if (target.tagName === "TEXTAREA" && target.closest("[id$='_prompt']")) {
            panes.forEach(pane => pane.markActiveCards());
        }
    }

    // A card under the mouse or keyboard focus gets its buttons.
    function onPointerOrFocus(event) {
        const card = event.target.closest ? event.target.closest(".extra-network-pane .card") : null;
        if (!card) return;
        const pane = paneFor(card);
        if (pane) pane.addButtons(card);
    }

    function onKeyDown(event) {
        if (event.key !== "Enter" && event.key !== " ") return;
        const card = event.target.classList && event.target.classList.contains("card") ? event.target : null;
        if (!card) return;
        event.preventDefault();
        card.click();
    }

    const scheduled = new Set();
    function onScroll(event) {
        const target = event.target;
        if (!target.classList || !target.classList.contains("extra-network-cards-scroll")) return;
        const pane = paneFor(target);
        if (!pane || scheduled.has(pane)) return;
        scheduled.add(pane);
        requestAnimationFrame(() => {
            scheduled.delete(pane);
            pane.render(false);
        });
    }

    document.addEventListener("click", onClick);
    document.addEventListener("input", onInput);
    document.addEventListener("keydown", onKeyDown);
    document.addEventListener("scroll", onScroll, true);
    document.addEventListener("mouseover", onPointerOrFocus);
    document.addEventListener("focusin", onPointerOrFocus);

    // Called after settings are applied or the checkpoint changes: options, filters and sizes may differ.
    window.extraNetworksReloadAll = function() {
        discoverPanes();
        panes.forEach(pane => pane.load(false));
    };
    window.extraNetworksRefreshSingleCard = function(page, tabname, name) {
        panes.forEach(pane => {
            if (pane.page === page && pane.tabname === tabname) pane.refreshSingleCard(name);
        });
    };
    window.extraNetworksPanes = panes;
    window.extraNetworksPaneFor = paneFor;
    window.ExtraNetworksPane = ExtraNetworksPane; // extraNetworksTree.js and extraNetworksDrag.js add methods

    (window.webuiUiLoadedCallbacks = window.webuiUiLoadedCallbacks || []).push(function() {
        discoverPanes();
        // Panes that gradio renders later (other tabs) are picked up as they appear.
        const observer = new MutationObserver(() => {
            const roots = window.gradioApp().querySelectorAll(".extra-network-pane");
            if (Array.from(roots).some(root => !panes.has(root.id) || panes.get(root.id).root !== root)) discoverPanes();
        });
        observer.observe(window.gradioApp(), {childList: true, subtree: true});
    });
})();
