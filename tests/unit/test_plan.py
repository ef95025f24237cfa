"""`rntp plan` (rntp/tools/plan.py): every formula against numbers worked by hand here, attention pairs
against a brute-force count over a boolean mask, FITS / DOES NOT FIT, the CLI's one-line errors,
and the RLP recipe (configs/rlp-qwen3-1.7b*.yaml)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rntp.config import load_config
from rntp.tools.plan import (Shape, activation_bytes, builtin_shapes, layer_activation_bytes, logits_chunk_bytes,
                             logits_chunk_tokens, memory_per_gpu, pack_shape, position_pairs, resolve_shape,
                             row_pairs, state_bytes_per_param, step_flops, zero_buckets)

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

Q05 = builtin_shapes()["qwen2.5-0.5b"]  # rntp.tools.plan.SHAPES' Qwen2.5-0.5B numbers
# A small config: P=2 positions, G=4, C=10, T=3, H=2 (branches of 3 + 3 + 2 = 8 tokens).
SMALL = ["train.positions_per_step=2", "rollout.group_size=4", "data.chunk_tokens=10", "data.min_context=2",
         "rollout.max_thought_tokens=3", "data.horizon=2", "train.micro_batch=4"]


def test_parameter_counts_of_qwen25_05b_and_qwen3_17b():
    # Qwen2.5-0.5B, one layer: q 896*896 = 802,816; k, v 2 * 896 * 128 = 229,376; o 802,816;
    # q/k/v biases 896 + 2 * 128 = 1,152; MLP 3 * 896 * 4864 = 13,074,432; two norms 1,792
    # -> 14,912,384. N = 24 * 14,912,384 + 896 (final norm) = 357,898,112.
    # Embedding 151,936 * 896 = 136,134,656 (tied): 494,032,768 in all (the published 0.49 B).
    assert Q05.layer_params() == 14_912_384
    assert Q05.non_embedding() == 357_898_112
    assert Q05.params() == 494_032_768
    # Qwen3-1.7B, one layer: q 2048 * 2048 = 4,194,304; k, v 2 * 2048 * 1024 = 4,194,304; o 4,194,304;
    # q/k norms 2 * 128 = 256; MLP 3 * 2048 * 6144 = 37,748,736; norms 4,096 -> 50,336,000.
    # N = 28 * 50,336,000 + 2,048 = 1,409,410,048; + embedding 151,936 * 2048 = 311,164,928 (tied)
    # = 1,720,574,976 (the model card's 1.7 B, 1.4 B non-embedding).
    q3 = builtin_shapes()["qwen3-1.7b"]
    assert q3.layer_params() == 50_336_000
    assert q3.non_embedding() == 1_409_410_048
    assert q3.params() == 1_720_574_976
    # an untied head counts the vocabulary matrix twice: Qwen3-8B = N + 2 * 151,936 * 4096
    q8 = builtin_shapes()["qwen3-8b"]
    assert q8.params() == q8.non_embedding() + 2 * 151_936 * 4096


def test_pack_shape_whole_groups_and_split_groups():
    # micro_batch 4 >= G 4: one group per pack, one trunk of C+H = 12, 4 branches of 8: W = 12 + 32 = 44
    assert pack_shape(10, 2, 3, 4, 4) == {"trunks": 1, "branches": 4, "trunk_tokens": 12, "branch_tokens": 8,
                                          "tokens": 44, "trunk_copies_per_position": 1}
    # micro_batch 8 = 2 groups per pack, each with its trunk: W = 2 * 12 + 8 * 8 = 88
    assert pack_shape(10, 2, 3, 4, 8)["tokens"] == 88
    # micro_batch 2 < G 4: the group is split over 2 packs, each holding the context: W = 12 + 2 * 8 = 28
    split = pack_shape(10, 2, 3, 4, 2)
    assert (split["tokens"], split["trunk_copies_per_position"]) == (28, 2)
    # micro_batch 3 < G 4: ceil(4 / 3) = 2 packs per position
    assert pack_shape(10, 2, 3, 4, 3)["trunk_copies_per_position"] == 2


def test_position_pairs_by_hand():
    # trunk C+H = 12: 12 * 13 / 2 = 78 pairs; a branch of b = 8 tokens seeing C = 10 trunk tokens:
    # 8 * 10 + 8 * 9 / 2 = 80 + 36 = 116; G = 4 branches: 464. One trunk: 542; two copies: 620.
    assert position_pairs(10, 2, 3, 4) == 542
    assert position_pairs(10, 2, 3, 4, trunk_copies=2) == 620
    # a trunk without the target (the update's): 10 * 11 / 2 = 55 + 464 = 519
    assert position_pairs(10, 2, 3, 4, trunk_target=False) == 519
    assert row_pairs(12, 8, 10, 4) == 542


def brute_force_pairs(trunk: int, limit: int, branch: int, branches: int) -> int:
    """Count (query, key) pairs of one row with Python loops over a boolean mask: the trunk causal,
    each branch seeing the trunk's first `limit` tokens and itself causally."""
    width = trunk + branches * branch
    owner = [-1] * trunk + [b for b in range(branches) for _ in range(branch)]
    mask = [[False] * width for _ in range(width)]
    for q in range(width):
        for k in range(q + 1):
            if owner[q] == -1:
                mask[q][k] = True  # trunk: causal
            elif owner[k] == -1:
                mask[q][k] = k < limit  # branch -> trunk[:limit]
            else:
                mask[q][k] = owner[k] == owner[q]  # its own branch, causally
    return sum(row.count(True) for row in mask)


@pytest.mark.parametrize("C,H,T,branches", [(10, 2, 3, 4), (7, 1, 5, 3), (16, 4, 0, 2), (5, 3, 2, 1)])
def test_pairs_equal_a_brute_force_mask_and_pack_layout(C, H, T, branches):
    from rntp.forward.attention import Branch, PackLayout, RowLayout

    b = 3 + T + H
    expected = brute_force_pairs(C + H, C, b, branches)
    assert row_pairs(C + H, b, C, branches) == expected
    assert position_pairs(C, H, T, branches) == expected  # one position, G = branches
    layout = PackLayout([RowLayout(C + H + branches * b, C + H,
                                   [[Branch(C + H + i * b, b, C) for i in range(branches)]])])
    assert layout.pairs() == expected


def test_pairs_of_real_packs_with_split_groups():
    """The formula with trunk copies equals the pairs of the packs `build_packs` makes."""
    from rntp.forward.packing import build_packs
    from rollout.spans import Rollout

    C, H, T, G = 10, 2, 3, 4
    context, target = list(range(100, 100 + C)), [7, 8]
    rollouts = [Rollout(0, context + [1, 2], [50 + i, 51, 52, 3], T, True) for i in range(G)]  # 2 + 3 + 1 tags
    for micro_batch, copies in ((4, 1), (2, 2), (3, 2)):
        packs = build_packs([context], rollouts, [target], micro_batch=micro_batch, no_think=True)
        assert len(packs) == copies
        assert sum(p.layout().pairs() for _, p in packs) == position_pairs(C, H, T, G, trunk_copies=copies)


def test_step_flops_by_hand():
    cfg = load_config(None, SMALL)
    f = step_flops(cfg, Q05)
    # N = 357,898,112, 2N = 715,796,224; head per read 2 * 896 * 151,936 = 272,269,312;
    # attention per pair 4 * 24 layers * 14 heads * 64 = 86,016.
    # sampling: P G T = 2 * 4 * 3 = 24 tokens, 24 * 2N = 17,179,109,376
    assert f["sample_tokens"] == 24 and f["sample"] == 17_179_109_376
    # scoring: tokens 2 * 12 + 2 * 4 * 8 = 88 -> 2N * 88 = 62,990,067,712; reads 2 * 4 * 5 + 2 * 2 = 44
    # -> 11,979,849,728; pairs 2 * 542 = 1,084 -> 93,241,344. Sum 75,063,158,784.
    assert f["score_tokens"] == 88 and f["score"] == 75_063_158_784
    # update (trunk C = 10 without the target): tokens 2 * 10 + 64 = 84 -> 2N * 84 = 60,126,882,816;
    # pairs 2 * 519 = 1,038 -> 89,284,608; body 60,216,167,424. Head reads 2 * 4 * 5 = 40 ->
    # 10,890,772,480. No checkpointing: 3 * body + 4 * head = 180,648,502,272 + 43,563,089,920
    assert f["update_tokens"] == 84 and f["update"] == 224_211_592_192
    assert f["total"] == 17_179_109_376 + 75_063_158_784 + 224_211_592_192
    assert "baseline" not in f and "reference" not in f
    # gradient checkpointing adds one body forward; two epochs double the update
    ckpt = step_flops(load_config(None, SMALL + ["model.gradient_checkpointing=true", "grpo.epochs=2"]), Q05)
    assert ckpt["update"] == 2 * (4 * 60_216_167_424 + 4 * 10_890_772_480)
    # an EMA baseline: P (C+H) = 24 tokens, P H = 4 reads, P * 78 = 156 pairs
    # = 2N * 24 + 4 * 272,269,312 + 156 * 86,016 = 17,179,109,376 + 1,089,077,248 + 13,418,496
    ema = step_flops(load_config(None, SMALL + ["reward.baseline=ema"]), Q05)
    assert ema["baseline"] == 18_281_605_120
    # KL on: one more forward of the update's packs: body + head = 71,106,939,904
    kl = step_flops(load_config(None, SMALL + ["grpo.kl_coef=0.1"]), Q05)
    assert kl["reference"] == 71_106_939_904
    # split groups (micro_batch 2): the trunk twice per position, 2 * 2 * 12 + 64 = 112 scoring tokens
    assert step_flops(load_config(None, SMALL + ["train.micro_batch=2"]), Q05)["score_tokens"] == 112


def test_state_bytes_per_param_by_backend():
    assert state_bytes_per_param("ddp", 2, 8, "float32")[0] == 16  # 4 + 4 + 8
    assert state_bytes_per_param("none", 2, 1, "float32")[0] == 16
    assert state_bytes_per_param("deepspeed", 1, 8, "float32")[0] == 4 + 4 + 8 / 8  # 9
    assert state_bytes_per_param("deepspeed", 2, 8, "float32")[0] == 4 + 12 / 8  # 5.5
    assert state_bytes_per_param("deepspeed", 3, 8, "float32")[0] == 16 / 8  # 2
    assert state_bytes_per_param("fsdp2", 2, 32, "float32")[0] == 0.5
    # pure bf16: torch keeps AdamW's moments in bf16 -> 2 + 2 + 4; DeepSpeed keeps fp32 master and moments
    assert state_bytes_per_param("ddp", 2, 8, "bfloat16")[0] == 8
    assert state_bytes_per_param("fsdp2", 2, 8, "bfloat16")[0] == 1
    assert "pure bf16" in state_bytes_per_param("ddp", 2, 8, "bfloat16")[1]


def test_deepspeed_bf16_layout_keeps_fp32_gradients():
    # DeepSpeed's bf16 mode (model.autocast_bf16 or model.dtype=bfloat16; rntp/engines/deepspeed.py sets
    # grad_accum_dtype fp32 with it). ZeRO-2 (stage_1_and_2.py): the module in bf16, whole (2), and per GPU a
    # 1/n share of the fp32 master weights (4), the fp32 gradient partition (4) and AdamW's moments (8):
    # 2 + 16/8 = 4. ZeRO-1 (bf16_optimizer.py): the fp32 gradient buffer is whole: 2 + 4 + 12/8 = 7.5.
    assert state_bytes_per_param("deepspeed", 2, 8, "bfloat16")[0] == 4.0
    assert state_bytes_per_param("deepspeed", 1, 8, "bfloat16")[0] == 7.5
    # without bf16 (fp32 module, fp32 gradients) ZeRO-2 stays 4 + 12/8
    assert state_bytes_per_param("deepspeed", 2, 8, "float32")[0] == 5.5


def test_zero2_reduce_bucket_by_hand(tmp_path):
    # DeepSpeed's default reduce bucket is 5e8 elements (zero/config.py) in the module's dtype (bf16: 1e9 B),
    # plus the flattened copy one reduction makes of a rank's share: at most min(5e8, params / n) elements.
    # Qwen2.5-0.5B on 8 GPUs: 494,032,768 / 8 = 61,754,096 elements x 2 B = 123,508,192 B.
    b = zero_buckets(load_config(None, SMALL + ["dist.backend=deepspeed", "model.autocast_bf16=true"]),
                     494_032_768, 8)
    assert b["reduce_bucket"] == 1_000_000_000 and b["reduce_flatten"] == 123_508_192
    assert b["total"] == 1_123_508_192
    # a JSON with its own sizes and overlap_comm (two buckets); fp32 module: 4 B per element
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 1e7}}))
    own = zero_buckets(load_config(None, SMALL + ["dist.backend=deepspeed", f"dist.deepspeed_config={ds}"]),
                       494_032_768, 8)
    assert own["reduce_bucket"] == 2 * 10_000_000 * 4 and own["reduce_flatten"] == 10_000_000 * 4
    # none for the other backends and stages
    assert zero_buckets(load_config(None, SMALL + ["dist.backend=ddp"]), 494_032_768, 8)["total"] == 0
    assert zero_buckets(load_config(None, SMALL + ["dist.backend=deepspeed", "dist.zero_stage=3"]),
                        494_032_768, 8)["total"] == 0


def test_activation_bytes_by_hand():
    # fp32 weights, bf16 autocast: residual 4 B, compute 2 B. Per token and layer (no q/k norms): each of
    # the two RMSNorms keeps its input in fp32 and its normalised output, 2 * 896 * (4 + 4) = 14,336; then
    # 2 * (5 * 896 + 3 * 896 + 2 * 128 + 4 * 4864) = 2 * 26,880 = 53,760 -> 68,096
    assert layer_activation_bytes(Q05, 4, 2, autocast=True) == 68_096
    # pure bf16: norms 2 * 896 * (4 + 2) = 10,752 + 2 * (2 * 896 + 2,688 + 256 + 19,456) = 48,384 -> 59,136
    assert layer_activation_bytes(Q05, 2, 2, autocast=False) == 59_136
    # Qwen3-1.7B with a bf16 module (DeepSpeed's bf16 mode): norms 2 * 2048 * 6 = 24,576; q/k norms keep
    # fp32 q and k and their bf16 outputs, (2048 + 1024) * (4 + 2) = 18,432; then
    # 2 * (2 * 2048 + 3 * 2048 + 2 * 1024 + 4 * 6144) = 2 * 36,864 = 73,728 -> 116,736
    assert layer_activation_bytes(builtin_shapes()["qwen3-1.7b"], 2, 2, autocast=False) == 116_736
    assert logits_chunk_tokens(151_936) == 883  # 2**27 = 134,217,728; 883 * 151,936 = 134,159,488
    pack = pack_shape(10, 2, 3, 4, 4)  # W = 44, reads 4 * (3 + 2) = 20
    a = activation_bytes(Q05, pack, 10, checkpointing=True, dtype="float32", autocast=True)
    assert a["layer_inputs"] == 24 * 44 * 896 * 4 == 3_784_704
    assert a["one_layer"] == 44 * 68_096 == 2_996_224
    assert a["attention_copies"] == 4 * (10 + 8) * 128 * 2 * 2 == 36_864  # branches x (C+b) x kv_dim x K,V x 2 B
    # a chunk holds at most the pack's 20 reads; plain log-softmax (temperature 1): 3 fp32 [20 x vocab]
    assert a["logits"] == 3 * 20 * 151_936 * 4 == 36_464_640
    assert a["total"] == 3_784_704 + 2_996_224 + 36_864 + 36_464_640
    full = activation_bytes(Q05, pack, 10, checkpointing=False, dtype="float32", autocast=True)
    assert full["layers"] == 24 * 2_996_224 and full["attention_copies"] == 24 * 36_864
    # DeepSpeed's bf16 mode casts the module to bf16 (engine.py _configure_distributed_model): the residual
    # stream is bf16 whatever model.dtype says, and autocast has nothing to cast: 24 * 44 * 896 * 2
    ds = activation_bytes(Q05, pack, 10, checkpointing=True, dtype="float32", autocast=True, bf16_module=True)
    assert ds["layer_inputs"] == 1_892_352 and ds["one_layer"] == 44 * 59_136


def test_logits_chunk_counts_what_one_chunk_keeps():
    # Qwen3's vocabulary: chunks of 883 tokens, one fp32 [883 x 151,936] tensor = 536,637,952 B. In the
    # update's backward (recomputed chunk) a plain read keeps the log-softmax output and makes two gradients:
    # 3 such tensors; at temperature != 1 the tempered logits are kept too (the sampling path): 4; a top-p
    # nucleus sorts (fp32 values, int64 indices), sums and masks: 9 (measured on CPU, see below).
    one = 883 * 151_936 * 4
    assert logits_chunk_bytes(151_936, 10**6) == 3 * one
    assert logits_chunk_bytes(151_936, 10**6, temperature=0.7) == 4 * one == 2_146_551_808
    assert logits_chunk_bytes(151_936, 10**6, temperature=0.7, top_p=0.9) == 9 * one
    assert logits_chunk_bytes(151_936, 100, temperature=0.7) == 4 * 100 * 151_936 * 4  # fewer reads than a chunk


def test_memory_per_gpu_by_hand_and_fits():
    cfg = load_config(None, SMALL + ["dist.backend=deepspeed", "dist.zero_stage=2", "rollout.sampler=vllm",
                                     "rollout.vllm.dtype=bfloat16", "reward.baseline=ema",
                                     "model.autocast_bf16=true", "model.gradient_checkpointing=true"])
    m = memory_per_gpu(cfg, Q05, gpus=8, gpu_memory_gb=80)
    params = 494_032_768
    assert m["state"]["bytes"] == 4 * params == 1_976_131_072  # ZeRO-2 in bf16 mode: 2 + 16/8
    assert m["frozen"]["ema_teacher"]["bytes"] == 4 * params == 1_976_131_072
    assert m["vllm"]["bytes"] == 0.3 * 80e9 and m["vllm"]["weights"] == 2 * params
    # bf16 module: layer inputs 1,892,352, one layer 44 * 59,136 = 2,601,984, copies 36,864, logits
    # 3 * 20 * 151,936 * 4 = 36,464,640 (temperature 1); buckets 1e9 + 61,754,096 * 2
    acts = 1_892_352 + 2_601_984 + 36_864 + 36_464_640
    assert m["activations"]["total"] == acts and m["buckets"]["total"] == 1_123_508_192
    assert m["train_phase"] == 1_976_131_072 + 1_976_131_072 + acts + 1_123_508_192 + 24e9
    assert m["fits"] and m["peak"] == m["train_phase"]
    # sleep_level 1: the engine is off the GPU while training; the peak is the sampling phase
    asleep = memory_per_gpu(load_config(None, SMALL + ["rollout.sampler=vllm", "rollout.vllm.sleep_level=1"]), Q05)
    assert asleep["train_phase"] == asleep["state"]["bytes"] + asleep["activations"]["total"]
    # the initial model (KL) in model.dtype: 4 B/param in fp32
    kl = memory_per_gpu(load_config(None, SMALL + ["grpo.kl_coef=0.05"]), Q05)
    assert kl["frozen"]["initial_model"]["bytes"] == 4 * params


def test_does_not_fit_a_7b_model_unsharded():
    # Qwen2.5-7B under DDP: 16 B/param x 7.6 B params = 122 GB of state alone, over 80 GB
    cfg = load_config(None, SMALL + ["dist.backend=ddp"])
    m = memory_per_gpu(cfg, builtin_shapes()["qwen2.5-7b"], gpus=8, gpu_memory_gb=80)
    assert m["state"]["bytes"] > 120e9 and not m["fits"]
    assert any("> 80 GB" in p for p in m["problems"])
    # sharded over 8 (FSDP2: 2 B/param = 15 GB) the state fits, but an fp32 engine's weights (4 B/param,
    # 30 GB) do not fit its 0.3 x 80 = 24 GB share; with bf16 weights (15 GB) everything fits
    sharded = memory_per_gpu(load_config(None, SMALL + ["dist.backend=fsdp2"]), builtin_shapes()["qwen2.5-7b"])
    assert not sharded["fits"] and "does not hold its weights" in sharded["problems"][0]
    assert memory_per_gpu(load_config(None, SMALL + ["dist.backend=fsdp2", "rollout.vllm.dtype=bfloat16"]),
                          builtin_shapes()["qwen2.5-7b"])["fits"]


def test_cli_prints_fits_and_does_not_fit(capsys):
    from rntp.cli import main

    assert main(["plan", "--model-shape", "qwen2.5-0.5b", *SMALL]) == 0
    assert "=> FITS on 8 x 80 GB" in capsys.readouterr().out
    assert main(["plan", "--model-shape", "qwen2.5-7b", "dist.backend=ddp", *SMALL]) == 0
    assert "=> DOES NOT FIT on 8 x 80 GB" in capsys.readouterr().out
    assert main(["plan", "--model-shape", "qwen2.5-0.5b", "--json", "--gpus", "2", *SMALL]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["memory"]["gpus"] == 2 and report["memory"]["fits"] is True
    assert report["flops"]["total"] == step_flops(load_config(None, SMALL), Q05)["total"]


@pytest.mark.parametrize("argv, message", [
    (["--model-shape", "qwen9-1b"], "unknown --model-shape 'qwen9-1b'; known:"),
    (["model.name_or_path=/nonexistent/model"], "no config.json at /nonexistent/model"),
    (["model.name_or_path=Some-Org/Qwen3-1.7B-Base-not-cached"], "pass --model-shape qwen3-1.7b"),
    (["--config", "no/such.yaml"], "config file not found"),
    (["--gpus", "0"], "--gpus must be at least 1"),
    (["train.nope=1"], "invalid config"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, monkeypatch, argv, message):
    from rntp.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("rntp plan: error:") and "Traceback" not in err
    if message != "invalid config":  # a config error lists its fields on following lines
        assert len(err.strip().splitlines()) == 1


def test_shape_from_a_local_config_json(tmp_path):
    """A model folder's config.json (read by transformers' AutoConfig, no weights) gives the same shape."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "tie_word_embeddings": True}))
    shape, source = resolve_shape(str(tmp_path))
    assert shape == Q05 and source.endswith("config.json")
    assert isinstance(shape, Shape)


def test_rlp_recipes_load_and_the_single_node_one_fits_on_8x80gb(capsys):
    from rntp.cli import main

    for path in ("configs/rlp-qwen3-1.7b.yaml", "configs/rlp-qwen3-1.7b-multinode.yaml"):
        cfg = load_config(path)
        assert (cfg.reward.name, cfg.reward.baseline, cfg.reward.ema_decay) == ("info_gain", "ema", 0.999)
        assert (cfg.rollout.group_size, cfg.rollout.max_thought_tokens, cfg.rollout.temperature) == (16, 2048, 0.7)
        assert (cfg.data.chunk_tokens, cfg.grpo.kl_coef, cfg.optim.lr) == (2048, 0.0, 1e-6)
        assert cfg.rollout.vllm.max_model_len >= 2048 + 2048 + 2  # context + thought + Qwen3's two tag tokens

    assert main(["plan", "--config", "configs/rlp-qwen3-1.7b.yaml", "--model-shape", "qwen3-1.7b"]) == 0
    out = capsys.readouterr().out
    assert "=> FITS on 8 x 80 GB" in out
    assert main(["plan", "--config", "configs/rlp-qwen3-1.7b.yaml", "--model-shape", "qwen3-1.7b", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["memory"]
    # By hand: 1,720,574,976 params; DeepSpeed ZeRO-2 on 8 GPUs in bf16 mode (autocast_bf16): bf16 module 2 +
    # (fp32 master 4 + fp32 gradients 4 + AdamW 8) / 8 = 4 B/param = 6,882,299,904 B; the fp32 EMA teacher
    # 4 B/param = 6,882,299,904 B.
    assert m["state"]["bytes"] == 6_882_299_904
    assert m["frozen"]["ema_teacher"]["bytes"] == 6_882_299_904
    # a pack of one group: trunk 2048 + 1, 16 branches of 3 + 2048 + 1: W = 2,049 + 16 * 2,052 = 34,881
    assert m["pack"]["tokens"] == 34_881
    # checkpointed layer inputs in bf16 (the module DeepSpeed cast): 28 * 34,881 * 2048 * 2 = 4,000,432,128 B;
    # one layer recomputed: 34,881 * 116,736 = 4,071,868,416 B
    assert m["activations"]["layer_inputs"] == 4_000_432_128
    assert m["activations"]["one_layer"] == 4_071_868_416
    # the head at temperature 0.7: 4 fp32 chunks of 883 x 151,936 = 2,146,551,808 B
    assert m["activations"]["logits"] == 2_146_551_808
    # the reduce bucket: 5e8 bf16 elements + the flattened share, 1,720,574,976 / 8 = 215,071,872 x 2 B
    assert m["buckets"]["total"] == 1_000_000_000 + 430_143_744
    assert m["vllm"]["bytes"] == 0.5 * 80e9
    assert m["fits"] and m["peak"] < 80e9
    # ... and the multi-node recipe fits on 32 of them
    assert main(["plan", "--config", "configs/rlp-qwen3-1.7b-multinode.yaml", "--model-shape", "qwen3-1.7b",
                 "--gpus", "32"]) == 0
    assert "=> FITS on 32 x 80 GB" in capsys.readouterr().out


def _mmap_large_blocks() -> None:
    """glibc serves every block over 64 KiB by mmap from now on, so a freed tensor leaves the resident set
    at once and a later one is not served from pages already resident: the peak counts live tensors."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, no longer raised by frees


def _rss_peak_of(work) -> int:
    """Bytes the process's resident set rose to while `work()` ran, above where it stood before (Linux:
    /proc/self/clear_refs resets the high-water mark). Call `_mmap_large_blocks` before any tensor is made."""
    import ctypes
    import gc

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the heap's free pages leave the resident set
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS:")
    work()
    return status("VmHWM:") - base


def measured_activation_peak(checkpointing: bool, vocab: int, temperature: float) -> tuple[int, int]:
    """The measurement of the test below, run in a fresh process (`test_activation_estimate_...`): the peak
    resident memory of one micro-pass less the parameter gradients, and `activation_bytes`' estimate."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rntp.forward.packing import build_packs, packed_logprobs
    from rollout.spans import Rollout

    C, T, G, hidden, layers = 512, 256, 4, 256, 4
    _mmap_large_blocks()
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).train()
    if checkpointing:
        model.gradient_checkpointing_enable()  # as rntp.models loads the policy
    gen = torch.Generator().manual_seed(0)
    doc = torch.randint(10, vocab, (C + 1,), generator=gen).tolist()
    rollouts = [Rollout(0, doc[:C] + [1], torch.randint(10, vocab, (T,), generator=gen).tolist() + [2], T, True)
                for _ in range(G)]
    ((_, pack),) = build_packs([doc[:C]], rollouts, [doc[C:]], micro_batch=G)

    def micro_pass():
        packed_logprobs(model, pack, temperature=temperature, autocast=True).logp.sum().backward()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: no per-thread scratch in the count
    try:
        micro_pass()  # warm-up: lazily made kernels and caches
        model.zero_grad(set_to_none=True)
        peak = _rss_peak_of(micro_pass)
    finally:
        torch.set_num_threads(threads)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())  # state, not activations
    shape = Shape(hidden, layers, 4, 2, hidden // 4, 3 * hidden, vocab, tied=True, qk_norm=True)
    estimate = activation_bytes(shape, pack_shape(C, 1, T, G, G), C, checkpointing=checkpointing, dtype="float32",
                                autocast=True, bf16_module=True, temperature=temperature)["total"]
    return peak - grads, estimate


@pytest.mark.parametrize("checkpointing, vocab, temperature", [(False, 512, 0.7), (True, 16384, 0.7)])
def test_activation_estimate_against_a_measured_cpu_peak(checkpointing, vocab, temperature):
    """One update micro-pass (packed forward + backward) of a narrow random Qwen3 in bf16 with autocast, as
    DeepSpeed's bf16 mode runs it, at a pack of C=512, G=4, T=256, H=1 (about 1,550 tokens): its peak CPU memory
    against `activation_bytes`. Without checkpointing the layers dominate; with it and a 16k vocabulary the
    head's chunk does. The estimate counts what backward keeps; allocation order and transients move the
    measured peak, so the two must agree within a factor of 1.35. Measured in a fresh process: after a suite
    of other tests, this process's heap holds pages that move its resident set (151 MB against 109 MB)."""
    import json
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self")
    code = ("import json; from tests.unit.test_plan import measured_activation_peak as m; "
            f"print(json.dumps(m({checkpointing}, {vocab}, {temperature})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    measured, estimate = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"checkpointing={checkpointing} vocab={vocab} T={temperature}: measured {measured / 1e6:.1f} MB, "
          f"estimate {estimate / 1e6:.1f} MB, ratio {estimate / measured:.2f}")
    assert 1 / 1.35 < estimate / measured < 1.35
