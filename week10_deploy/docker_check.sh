#!/usr/bin/env bash
# Week 10: build the service's image from a bundle, run it on this machine's loopback, and use it
# as a client would. Every step either passes or stops the script with a one-line reason.
#
#   bash week10_deploy/docker_check.sh runs/week10/part2/<time>/bundle
#
# 1. a build context holding only what the Dockerfile copies (common/, week10_deploy/ and the
#    bundle; not the whole repository with its runs and virtual environment), then docker build
# 2. the image: its size, no torch inside, and it runs as a user that is not root
# 3. the container on the host's network, listening on 127.0.0.1 only (no traffic to Docker's
#    bridge addresses): GET /health, one image through POST /predict answered exactly as the
#    bundle answers here (predict_onnx.py, and eager PyTorch on model.pt2 where torch is
#    installed), and two bad requests answered 4xx
# 4. the container is removed on exit, whatever happened (trap)
#
# Environment: BASE_IMAGE  the image to build FROM (default python:3.11-slim, from a registry;
#                          the week README makes one offline with debootstrap)
#              IMAGE       tag of the built image (default dl-labs-serve:check)
#              PORT        loopback port (default: a free one)
#              PYTHON      this machine's Python with numpy, pillow, onnxruntime (default python3)
set -euo pipefail

fail() { echo "docker_check: FAILED: $*" >&2; exit 1; }
[[ $# -eq 1 ]] || { echo "usage: $0 BUNDLE_DIR" >&2; exit 2; }
BUNDLE=$(cd "$1" 2>/dev/null && pwd) || fail "no bundle folder $1"
[[ -f $BUNDLE/metadata.json && -f $BUNDLE/model.onnx ]] || fail "$BUNDLE has no metadata.json + model.onnx"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
IMAGE=${IMAGE:-dl-labs-serve:check}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
docker info >/dev/null 2>&1 || fail "no Docker engine answers (docker info failed): start dockerd first"
PORT=${PORT:-$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
URL="http://127.0.0.1:$PORT"
NAME="dl-labs-check-$$"
WORK=$(mktemp -d)
cleanup() {
    docker rm -f "$NAME" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # run the EXIT trap on Ctrl-C too

# ---- 1. A small build context, laid out as the repository, and the build ----
CONTEXT=$WORK/context
mkdir -p "$CONTEXT/common" "$CONTEXT/week10_deploy/standalone"
cp "$ROOT"/common/*.py "$CONTEXT/common/"
cp "$ROOT"/week10_deploy/*.py "$ROOT/week10_deploy/Dockerfile" "$CONTEXT/week10_deploy/"
cp "$ROOT"/week10_deploy/standalone/*.py "$ROOT"/week10_deploy/standalone/requirements.txt \
    "$CONTEXT/week10_deploy/standalone/"
cp -r "$BUNDLE" "$CONTEXT/week10_deploy/bundle"
echo "building $IMAGE from $BASE_IMAGE (context $(du -sh "$CONTEXT" | cut -f1))"
start=$SECONDS
docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" \
    -f "$CONTEXT/week10_deploy/Dockerfile" "$CONTEXT" >"$WORK/build.log" 2>&1 \
    || { tail -n 30 "$WORK/build.log" >&2; fail "docker build (last lines above)"; }
echo "built in $((SECONDS - start)) s"
# the image this tag named before is now untagged: remove such leftovers of this Dockerfile only
docker image prune --force --filter "label=dl-labs.image=week10-serve" >/dev/null || true

# ---- 2. The image itself ----
size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(docker image inspect --format '{{.Size}}' "$BASE_IMAGE" 2>/dev/null || echo 0)
echo "image size: $((size / 1000000)) MB ($(((size - base_size) / 1000000)) MB above $BASE_IMAGE)"
docker run --rm --network none "$IMAGE" python -c "import importlib.util as u, sys; \
sys.exit(u.find_spec('torch') is not None)" || fail "the image contains torch"
user=$(docker run --rm --network none "$IMAGE" id -u)
[[ $user != 0 ]] || fail "the image runs as root"
echo "no torch in the image; it runs as uid $user"

# ---- 3. The container on the loopback ----
docker run -d --name "$NAME" --network host -e HOST=127.0.0.1 -e "PORT=$PORT" "$IMAGE" >/dev/null
curl_() { curl --noproxy '*' --silent --show-error --max-time 10 "$@"; }
for _ in $(seq 600); do
    curl_ --fail --output /dev/null "$URL/health" 2>/dev/null && break
    [[ $(docker inspect --format '{{.State.Running}}' "$NAME") == true ]] \
        || { docker logs "$NAME" 2>&1 | tail -n 20 >&2; fail "the container exited (its log above)"; }
    sleep 0.1
done
health=$(curl_ --fail "$URL/health") || fail "GET /health did not answer within 60 s"
echo "GET /health: $health"

# One image (a drawn digit at the model's size and channels), and what the bundle says here.
"$PYTHON" - "$BUNDLE" "$WORK/digit.png" <<'EOF'
import json, sys
from PIL import Image, ImageDraw
c, h, w = json.load(open(f"{sys.argv[1]}/metadata.json"))["input_shape"]
image = Image.new("L", (w, h))
ImageDraw.Draw(image).line([(w * .25, h * .2), (w * .75, h * .2), (w * .4, h * .85)], fill=255, width=max(1, w // 9))
image.convert("L" if c == 1 else "RGB").save(sys.argv[2])
EOF
curl_ --fail -H 'Content-Type: image/png' --data-binary "@$WORK/digit.png" "$URL/predict?top_k=3" \
    >"$WORK/answer.json" || fail "POST /predict with a PNG failed"
"$PYTHON" "$ROOT/week10_deploy/standalone/predict_onnx.py" "$BUNDLE" "$WORK/digit.png" --top-k 3 --json \
    >"$WORK/local.json" || fail "predict_onnx.py could not classify the image here"
PYTHONPATH=$ROOT "$PYTHON" - "$BUNDLE" "$WORK" <<'EOF' || fail "the container's answer differs (above)"
import importlib.util, json, sys
bundle, work = sys.argv[1], sys.argv[2]
answer = json.load(open(f"{work}/answer.json"))["predictions"]
references = {"predict_onnx.py": next(iter(json.load(open(f"{work}/local.json"))["predictions"].values()))}
if importlib.util.find_spec("torch"):  # the eager model: PyTorch running the bundle's model.pt2
    from week10_deploy.service import TorchClassifier
    from week10_deploy.standalone.predict_onnx import decode_image
    model = TorchClassifier(bundle)
    references["eager PyTorch"] = model.classify(decode_image(open(f"{work}/digit.png", "rb").read(),
                                                               model.shape)[None], 3)[0]
shown = ", ".join(f"{p['class']} {p['probability']:.4f}" for p in answer)
for name, ref in references.items():
    same = [p["class"] for p in ref] == [p["class"] for p in answer] and all(
        abs(p["probability"] - q["probability"]) <= 1e-4 for p, q in zip(ref, answer))
    if not same:
        sys.exit(f"container: {answer}\n{name}: {ref}")
print(f"POST /predict (drawn digit): {shown}; equal to {' and '.join(references)} (probabilities within 1e-4)")
EOF

# Two bad requests: each must be a 4xx with a JSON message, never a 500.
bad() {  # $1: what it is, then curl's arguments
    local what=$1 code
    shift
    code=$(curl_ --output "$WORK/bad.json" --write-out '%{http_code}' "$@" "$URL/predict") || fail "$what: no answer"
    [[ $code == 4?? ]] || fail "$what answered $code, not 4xx: $(head -c 300 "$WORK/bad.json")"
    echo "bad request, $what: $code $(head -c 120 "$WORK/bad.json")"
}
bad "not an image" -H 'Content-Type: image/png' --data-binary 'this is not a PNG'
bad "wrong content type" -H 'Content-Type: text/plain' --data-binary 'hello'
echo "docker_check: OK ($IMAGE, $((size / 1000000)) MB)"
