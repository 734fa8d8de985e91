// Dropping a generated PNG onto a prompt box loads its parameters (A1111 behaviour): the infotext in the PNG's
// `parameters` text chunk goes into the prompt box and the paste button fills the other fields. Only file drops are
// handled here; card drags (text) are left to extraNetworks.js.
(function() {
    "use strict";

    function readChunks(bytes) {
        const texts = Object.create(null);  // chunk keywords come from the file: no prototype to write through
        const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
        const signature = [137, 80, 78, 71, 13, 10, 26, 10];
        if (bytes.length < 8 || signature.some((b, i) => bytes[i] !== b)) return texts;
        let pos = 8;
        while (pos + 12 <= bytes.length) {
            const length = view.getUint32(pos);
            const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
            const data = bytes.subarray(pos + 8, pos + 8 + length);
            if (type === "tEXt") {
                const zero = data.indexOf(0);
                if (zero > 0) {
                    const key = new TextDecoder("latin1").decode(data.subarray(0, zero));
                    texts[key] = new TextDecoder("latin1").decode(data.subarray(zero + 1));
                }
            } else if (type === "iTXt") {
                const zero = data.indexOf(0);
                // keyword \0 compression-flag compression-method language \0 translated \0 text
                if (zero > 0 && data[zero + 1] === 0) {
                    const key = new TextDecoder("latin1").decode(data.subarray(0, zero));
                    let rest = zero + 3;
                    rest = data.indexOf(0, rest) + 1;
                    rest = data.indexOf(0, rest) + 1;
                    if (rest > 0) texts[key] = new TextDecoder("utf-8").decode(data.subarray(rest));
                }
            } else if (type === "IEND") {
                break;
            }
            pos += 12 + length;
        }
        return texts;
    }

    function promptBox(target) {
        const area = target.closest && target.closest("textarea");
        if (!area) return null;
        const container = area.closest("#txt2img_prompt, #txt2img_neg_prompt");
        return container ? area : null;
    }

    function hasFile(event) {
        return event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
    }

    document.addEventListener("dragover", event => {
        if (hasFile(event) && promptBox(event.target)) event.preventDefault();
    });

    document.addEventListener("drop", event => {
        if (!hasFile(event)) return;
        const area = promptBox(event.target);
        const file = event.dataTransfer.files && event.dataTransfer.files[0];
        if (!area || !file || file.type !== "image/png") return;
        event.preventDefault();
        event.stopPropagation();
        file.arrayBuffer().then(buffer => {
            const text = readChunks(new Uint8Array(buffer)).parameters;
            if (!text) return;
            const prompt = document.querySelector("#txt2img_prompt textarea");
            prompt.value = text;
            prompt.dispatchEvent(new Event("input", {bubbles: true}));
            const paste = document.querySelector("#txt2img_paste");
            if (paste) setTimeout(() => paste.click(), 0);
        });
    }, true);

    window.readPngTextChunks = readChunks;
})();
