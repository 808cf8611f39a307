"""A drag-and-drop web page for a bundle (Gradio): drop an image, see the top classes.

Optional: it needs the ``ui`` extra (``pip install -e ".[ui]"``, Gradio 6); without it, importing
this file imports nothing extra and running it says how to install it. Like predict_onnx.py it
runs without PyTorch (ONNX Runtime does the work), on 127.0.0.1 unless you pass --host.

The page hands the uploaded file itself to ``decode_image``, the function the service runs on a
request's body: the same checks, the same conversion, so the page shows the service's answer.
(Gradio's default would convert every upload to RGB first, dropping transparency differently.)

Run: python week10_deploy/standalone/ui.py BUNDLE [--port 7860] [--top-k 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from PIL import Image

try:  # imported as week10_deploy.standalone.ui, or run as a file from this folder
    from .predict_onnx import BadInput, OnnxClassifier, decode_image, prepare_image
except ImportError:
    from predict_onnx import BadInput, OnnxClassifier, decode_image, prepare_image

INSTALL = 'the page needs Gradio: pip install -e ".[ui]"'
# A 28x28 digit would show as a speck: scale the preview up, without smoothing the pixels away.
CSS = "#upload img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"


def make_classify(model: OnnxClassifier, k: int):
    """The function the page calls: the uploaded file's path (or, called from Python, a PIL
    image) -> {class: probability} of the top k (what Gradio's Label component shows). A file
    that is not a usable image is an error shown on the page (gr.Error), with the message the
    service would answer."""

    def classify(image: str | Path | Image.Image | None) -> dict[str, float]:
        if image is None:
            return {}
        try:
            if isinstance(image, Image.Image):
                pixels = prepare_image(image, model.shape)  # (C, H, W) in [0, 1]
            else:  # the page's upload: the file's bytes, as a request body
                pixels = decode_image(Path(image).read_bytes(), model.shape)
        except BadInput as e:
            import gradio as gr

            raise gr.Error(e.message) from None
        top = model.classify(pixels[None], k)[0]  # (1, C, H, W) -> the top k of the one image
        return {p["class"]: p["probability"] for p in top}

    return classify


def build(model: OnnxClassifier, k: int):
    import gradio as gr

    meta = model.metadata
    c, h, w = model.shape
    # type="filepath" with image_mode=None: Gradio passes the file as uploaded (no conversion).
    image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                     label="drop an image", height=280, elem_id="upload")
    return gr.Interface(fn=make_classify(model, k), inputs=image,
                        outputs=gr.Label(num_top_classes=k, label="top classes"),
                        title=f"{meta['name']} (version {meta['version']})",
                        description=f"Any size or mode: converted to {c}x{h}x{w} as the service "
                                    "does.", flagging_mode="never")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle folder (model.onnx + metadata.json)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown (default 5)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("gradio") is None:
        print(f"error: {INSTALL}", file=sys.stderr)
        return 1
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before Gradio is imported
    try:
        model = OnnxClassifier(args.bundle)
    except Exception as e:
        print(f"error: cannot load the bundle {args.bundle}: {' '.join(str(e).split())[:200]}",
              file=sys.stderr)
        return 1
    build(model, max(1, args.top_k)).launch(server_name=args.host, server_port=args.port,
                                              css=CSS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
