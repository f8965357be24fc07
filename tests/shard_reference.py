"""mlx-lm's own tensor parallelism, the reference for mlx-ring's PARALLEL=tensor.

Run under the same launcher and world size as the ranks it is compared with (mpirun or
mlx.launch): every process loads the model with mlx-lm, splits it with the model's own
`shard(group)`, and generates greedily with `generate_step`, each prompt alone. Rank 0
prints a JSON object: for each model directory, the token ids of each prompt.

    python tests/shard_reference.py JOBS_JSON

JOBS_JSON: {"models": [dir, ...], "prompts": [{"text": str, "chat": bool}, ...],
"max_tokens": int, "prefill_step_size": int, "kwargs": {more arguments of generate_step}}
"""

from __future__ import annotations

import json
import sys

from config import Settings
from config.blas import use_blas

# The ranks compared with this use FAST_BLAS's default; so must this, before MLX loads.
use_blas(Settings.model_fields["fast_blas"].default)

import mlx.core as mx  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

from distributed.world import point_mlx_at_mpi  # noqa: E402


def prompt_ids(tokenizer, prompt: dict) -> list[int]:
    if prompt["chat"]:
        messages = [{"role": "user", "content": prompt["text"]}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return tokenizer.encode(prompt["text"])


def main() -> int:
    jobs = json.loads(sys.argv[1])
    point_mlx_at_mpi()
    group = mx.distributed.init(strict=True)
    out = {}
    for path in jobs["models"]:
        model, tokenizer = load(path)
        model.shard(group)
        results = []
        for prompt in jobs["prompts"]:
            ids, tokens = prompt_ids(tokenizer, prompt), []
            steps = generate_step(mx.array(ids), model, max_tokens=jobs["max_tokens"],
                                  prefill_step_size=jobs["prefill_step_size"], **jobs.get("kwargs", {}))
            for token, _ in steps:
                if token in tokenizer.eos_token_ids:
                    break
                tokens.append(token)
            results.append(tokens)
        out[path] = results
    if group.rank() == 0:
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
