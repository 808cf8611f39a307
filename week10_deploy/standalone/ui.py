"""A drag-and-drop web page for a bundle (Gradio): drop an image, see the top classes.

Optional: it needs the ``ui`` extra (``pip install -e ".[ui]"``); without it, importing this file
imports nothing extra and running it says how to install it. Like predict_onnx.py it runs
without PyTorch (ONNX Runtime does the work), on 127.0.0.1 unless you pass --host.

Run: python week10_deploy/standalone/ui.py BUNDLE [--port 7860] [--top-k 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import numpy as np

try:  # imported as week10_deploy.standalone.ui, or run as a file from this folder
    from .predict_onnx import OnnxClassifier, prepare_image
except ImportError:
    from predict_onnx import OnnxClassifier, prepare_image

INSTALL = 'the page needs Gradio: pip install -e ".[ui]"'


def make_classify(model: OnnxClassifier, k: int):
    """The function the page calls: a PIL image -> {class: probability} of the top k (what
    Gradio's Label component shows). The image is prepared exactly as the service prepares it."""

    def classify(image) -> dict[str, float]:
        if image is None:
            return {}
        pixels = prepare_image(image, model.shape)[None]
        top = model.classify(np.ascontiguousarray(pixels), k)[0]
        return {p["class"]: p["probability"] for p in top}

    return classify


def build(model: OnnxClassifier, k: int):
    import gradio as gr

    meta = model.metadata
    c, h, w = model.shape
    return gr.Interface(fn=make_classify(model, k), inputs=gr.Image(type="pil", label="drop an image"),
                        outputs=gr.Label(num_top_classes=k, label="top classes"),
                        title=f"{meta['name']} (version {meta['version']})",
                        description=f"Any size or mode: converted to {c}x{h}x{w} as the service does.",
                        flagging_mode="never")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle folder (model.onnx + metadata.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown (default 5)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("gradio") is None:
        print(f"error: {INSTALL}", file=sys.stderr)
        return 1
    try:
        model = OnnxClassifier(args.bundle)
    except Exception as e:
        print(f"error: cannot load the bundle {args.bundle}: {' '.join(str(e).split())[:200]}", file=sys.stderr)
        return 1
    build(model, max(1, args.top_k)).launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
