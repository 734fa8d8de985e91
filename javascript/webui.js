// Page helpers shared by every script (A1111 names): gradioApp(), onUiLoaded(), updateInput().
// Scripts may load in any order, so each one registers start-up work through onUiLoaded().
(function() {
    "use strict";

    function gradioApp() {
        const elems = document.getElementsByTagName("gradio-app");
        const elem = elems.length === 0 ? document : elems[0];
        if (elem !== document) {
            elem.getElementById = function(id) {
                return document.getElementById(id);
            };
        }
        return elem.shadowRoot ? elem.shadowRoot : elem;
    }

    // Tells gradio that a textarea's value changed (gradio listens for `input`).
    function updateInput(target) {
        const e = new Event("input", {bubbles: true});
        Object.defineProperty(e, "target", {value: target});
        target.dispatchEvent(e);
    }

    const queue = window.webuiUiLoadedCallbacks || [];
    let loaded = false;

    function runCallback(callback) {
        try {
            callback();
        } catch (e) {
            console.error("error running a UI-loaded callback", e);
        }
    }

    function onUiLoaded(callback) {
        if (loaded) runCallback(callback);
        else queue.push(callback);
    }

    function uiIsReady() {
        return gradioApp().querySelector("#txt2img_prompt textarea") !== null;
    }

    function markLoaded() {
        if (loaded) return;
        loaded = true;
        queue.splice(0).forEach(runCallback);
    }

    function watchForUi() {
        if (uiIsReady()) {
            markLoaded();
            return;
        }
        const observer = new MutationObserver(function() {
            if (uiIsReady()) {
                observer.disconnect();
                markLoaded();
            }
        });
        observer.observe(document.documentElement, {childList: true, subtree: true});
    }

    window.gradioApp = gradioApp;
    window.updateInput = updateInput;
    window.onUiLoaded = onUiLoaded;
    // Scripts that loaded before this one queued their callbacks here; later ones see onUiLoaded directly.
    window.webuiUiLoadedCallbacks = {push: onUiLoaded};

    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", watchForUi);
    else watchForUi();
})();
