// Folder buttons and the folder tree of a card pane (methods of ExtraNetworksPane, from extraNetworks.js).
(function() {
    "use strict";

    const {el, compareValues} = window.cardsDom;
    const TREE_FILES_LIMIT = 300;

    class PaneTree {
        // --- folder buttons and tree ---------------------------------------------------------------------------------
        folderList() {
            const folders = new Map(); // "Lora/chars" -> {path, root, depth}
            const showHidden = this.opts.extra_networks_show_hidden_directories !== false;
            this.items.forEach(item => {
                const parts = (item.rel || "").split("/");
                parts.pop();
                for (let depth = 1; depth < parts.length; depth++) {
                    const sub = parts.slice(1, depth + 1);
                    if (!showHidden && sub.some(p => p.startsWith("."))) break;
                    const path = parts.slice(0, depth + 1).join("/");
                    if (!folders.has(path)) folders.set(path, {path: path, label: sub.join("/")});
                }
            });
            return Array.from(folders.values()).sort((a, b) => compareValues(a.label, b.label));
        }

        buildDirs() {
            this.dirs.replaceChildren();
            if (this.opts.extra_networks_tree_view_style === "Tree") {
                this.root.classList.add("extra-network-tree-style");
                this.buildTree();
                return;
            }
            this.root.classList.remove("extra-network-tree-style");
            const leading = this.opts.extra_networks_dir_button_function ? "/" : "";
            const all = el("button", "extra-network-dir-button", "all");
            all.type = "button";
            all.dataset.search = "";
            this.dirs.appendChild(all);
            this.folderList().forEach(folder => {
                const button = el("button", "extra-network-dir-button", `${leading}${folder.label}/`);
                button.type = "button";
                button.dataset.search = `${leading}${folder.label}/`;
                this.dirs.appendChild(button);
            });
        }

        // A tree of folders (first) and files; folder children are built only when a folder is expanded.
        treeModel() {
            const rootNode = {name: "", path: "", dirs: new Map(), files: []};
            const showHidden = this.opts.extra_networks_show_hidden_directories !== false;
            this.items.forEach(item => {
                const parts = (item.rel || item.name).split("/");
                const file = parts.pop();
                if (!showHidden && parts.slice(1).some(p => p.startsWith("."))) return;
                let node = rootNode;
                parts.forEach((part, i) => {
                    if (!node.dirs.has(part)) {
                        node.dirs.set(part, {name: part, path: parts.slice(0, i + 1).join("/"), dirs: new Map(),
                            files: []});
                    }
                    node = node.dirs.get(part);
                });
                node.files.push({name: file, index: item.index});
            });
            return rootNode;
        }

        buildTree() {
            this.tree = this.treeModel();
            const list = el("ul", "tree-list tree-list--tree");
            this.tree.dirs.forEach(node => {
                this.treeState.expanded.add(node.path);
                list.appendChild(this.treeNodeElement(node));
            });
            this.dirs.appendChild(list);
        }

        treeNodeElement(node) {
            const li = el("li", "tree-list-item tree-list-item--dir");
            li.dataset.treePath = node.path;
            const row = el("span", "tree-list-content tree-list-content-dir");
            row.dataset.treePath = node.path;
            const chevron = el("span", "tree-list-item-action--chevron", "\u25B8");
            row.appendChild(chevron);
            row.appendChild(el("span", "tree-list-item-label", node.name));
            li.appendChild(row);
            if (this.treeState.expanded.has(node.path)) {
                li.classList.add("expanded");
                li.appendChild(this.treeChildren(node));
            }
            if (this.treeState.selected === node.path) row.classList.add("selected");
            return li;
        }

        treeChildren(node) {
            const ul = el("ul", "tree-list tree-list--subgroup");
            const dirs = Array.from(node.dirs.values()).sort((a, b) => compareValues(a.name, b.name));
            dirs.forEach(child => ul.appendChild(this.treeNodeElement(child)));
            const files = node.files.slice().sort((a, b) => compareValues(a.name, b.name));
            files.slice(0, TREE_FILES_LIMIT).forEach(file => {
                const li = el("li", "tree-list-item tree-list-item--file");
                const row = el("span", "tree-list-content tree-list-content-file", file.name);
                row.dataset.index = String(file.index);
                row.draggable = true;
                li.appendChild(row);
                ul.appendChild(li);
            });
            if (files.length > TREE_FILES_LIMIT) {
                ul.appendChild(el("li", "tree-list-item tree-list-more",
                    `\u2026 ${files.length - TREE_FILES_LIMIT} more (use search)`));
            }
            return ul;
        }

        findTreeNode(path) {
            let node = this.tree;
            for (const part of path.split("/")) {
                node = node && node.dirs.get(part);
            }
            return node;
        }

        // A1111's tree state machine: closed → select + expand; selected and open → collapse, deselect and
        // clear the search; open but not selected → select. The chevron only expands or collapses.
        treeDirClicked(row, chevronOnly) {
            const path = row.dataset.treePath;
            const li = row.parentElement;
            const expanded = this.treeState.expanded.has(path);
            const selected = this.treeState.selected === path;
            if (chevronOnly) {
                this.setTreeExpanded(li, path, !expanded);
                return;
            }
            if (!expanded) {
                this.setTreeExpanded(li, path, true);
                this.selectTreeDir(path);
            } else if (selected) {
                this.setTreeExpanded(li, path, false);
                this.selectTreeDir(null);
            } else {
                this.selectTreeDir(path);
            }
        }

        setTreeExpanded(li, path, expand) {
            const existing = li.querySelector(":scope > ul");
            if (expand) {
                this.treeState.expanded.add(path);
                li.classList.add("expanded");
                if (!existing) li.appendChild(this.treeChildren(this.findTreeNode(path)));
            } else {
                this.treeState.expanded.delete(path);
                li.classList.remove("expanded");
                if (existing) existing.remove();
            }
        }

        selectTreeDir(path) {
            this.treeState.selected = path;
            this.setSearch(path ? `${path}/` : "");
        }

        updateTreeSelection() {
            if (!this.dirs) return;
            this.dirs.querySelectorAll(".tree-list-content-dir").forEach(row => {
                row.classList.toggle("selected", row.dataset.treePath === this.treeState.selected);
            });
        }
    }
    window.cardsDom.addMethods(window.ExtraNetworksPane, PaneTree);
})();
