#!/usr/bin/env bash
# Continuous batching on a real-size checkpoint: the same requests one after another, then all
# at once, against `paligemma serve` on loopback. Prints each request's latency, the totals and
# the server's batch metrics.
#
#   tools/loadtest_batching.sh MODEL [TOKENS] [DTYPE]
#   tools/loadtest_batching.sh bench-cache/pg1-3b-224-bf16 64 bf16
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: $0 MODEL [TOKENS] [DTYPE]}
TOKENS=${2:-16}
DTYPE=${3:-bf16}
PORT=18181
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
IMG=$(base64 -w0 tests/fixtures/images/src/photo_640x480.png)

./target/release/paligemma serve --model "$MODEL" --dtype "$DTYPE" --port $PORT --max-batch 4 \
    2> "$WORK/server.err" &
SERVER=$!
until grep -q listening "$WORK/server.err"; do
    kill -0 $SERVER || { cat "$WORK/server.err"; exit 1; }
    sleep 1
done

# One request: prints its latency in seconds.
req() {
    local body="$WORK/body-$RANDOM.json"
    printf '{"image":"%s","prompt":"%s","max_new_tokens":%s}' "$IMG" "$1" "$TOKENS" > "$body"
    curl -s -o "$body.out" -w "%{time_total}" -XPOST "localhost:$PORT/v1/generate" \
        -H 'content-type: application/json' -d @"$body"
}

prompts=("caption en" "caption fr" "describe en" "answer en what is this?")
echo "warm-up (the image's features are cached from here on): $(req 'caption es') s"
t0=$(date +%s.%N)
for p in "${prompts[@]}"; do echo "one after another, $p: $(req "$p") s"; done
echo "one after another, total: $(echo "$(date +%s.%N) - $t0" | bc) s"
t0=$(date +%s.%N)
pids=()
for p in "${prompts[@]}"; do (echo "all at once, $p: $(req "$p") s") & pids+=($!); done
wait "${pids[@]}"
echo "all at once, total: $(echo "$(date +%s.%N) - $t0" | bc) s"
curl -s "localhost:$PORT/metrics" | grep -E '^paligemma_(batch_rows_(sum|count)|generated_tokens_total|image_feature)'
grep VmHWM /proc/$SERVER/status
kill -TERM $SERVER
wait $SERVER
