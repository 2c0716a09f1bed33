"""Tiny models built in the test: a 2-layer BERT with a real WordPiece tokenizer, saved as a HF folder."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the a of and to in is that it for was on with as his be at by this had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said what "
    "up its about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people lord king love good sweet night death heart eyes life fair"
).split()


def tiny_bert(
    folder: Path, task: str = "feature-extraction", layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0
) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = list(dict.fromkeys(vocab))  # a duplicate would leave a hole in the ids
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=128,
        num_labels=3,
    )
    torch.manual_seed(seed)
    heads = {"text-classification": BertForSequenceClassification, "token-classification": BertForTokenClassification}
    model = heads[task](config) if task in heads else BertModel(config)
    model.save_pretrained(folder)
    return folder


def tiny_recipe(model_dir: Path, **evaluate) -> dict:
    """A recipe dict for the tiny model: export, fuse, int8, a fast evaluation."""
    ev = {
        "data": {"source": "builtin:shakespeare", "calibration_size": 16, "evaluation_size": 40},
        "speed": {"batch_sizes": [1, 4], "seq_len": 16, "warmup": 1, "repeats": 2, "traffic_batch_size": 8, "traffic_texts": 24},
        "memory": False,
    }
    ev.update(evaluate)
    return {
        "name": "tiny",
        "model": {"source": str(model_dir), "task": "feature-extraction"},
        "stages": [
            {"compile.export": {}},
            {"compile.fuse": {"expect": {"Attention": 2, "SkipLayerNormalization": 4}}},
            {"quantize.dynamic_int8": {}},
        ],
        "evaluate": ev,
    }


def tiny_llama(folder: Path, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    """A 2-layer Llama (grouped-query attention, tied embeddings, like SmolLM2) with the tiny WordPiece tokenizer."""
    import torch
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    tiny_bert(folder)  # writes the tokenizer (and a BERT we overwrite below)
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    for f in folder.glob("model.safetensors"):
        f.unlink()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def tiny_decoder(kind: str, folder: Path, layers: int = 2, **overrides) -> Path:
    """A tiny random decoder of ``kind`` (qwen2, mistral, qwen3, phi3, gemma2, gemma3_text, gpt2) with the tiny tokenizer.
    Gemma's window (8) is shorter than the parity prompts, so a fused graph that ignores it fails."""
    import torch
    import transformers
    from transformers import BertTokenizerFast

    tiny_bert(folder)
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    ids = {"eos_token_id": tokenizer.sep_token_id, "bos_token_id": tokenizer.cls_token_id}
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **ids,
    }
    gemma = {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 32, "pad_token_id": 0, "tie_word_embeddings": True}
    config, cls = {
        "qwen2": (lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True), transformers.Qwen2ForCausalLM),
        # Mistral 7B v0.1's sliding window, shrunk below the parity prompts' length
        "mistral": (lambda: transformers.MistralConfig(**common, sliding_window=8), transformers.MistralForCausalLM),
        "qwen3": (
            lambda: transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True),
            transformers.Qwen3ForCausalLM,
        ),
        "phi3": (lambda: transformers.Phi3Config(**common, pad_token_id=0), transformers.Phi3ForCausalLM),
        "gemma2": (lambda: transformers.Gemma2Config(**common, **gemma), transformers.Gemma2ForCausalLM),
        "gemma3_text": (lambda: transformers.Gemma3TextConfig(**common, **gemma), transformers.Gemma3ForCausalLM),
        "gpt2": (
            lambda: transformers.GPT2Config(
                vocab_size=len(tokenizer), n_embd=64, n_layer=layers, n_head=4, n_positions=256, **ids
            ),
            transformers.GPT2LMHeadModel,
        ),
    }[kind]
    config = config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    cls(config).save_pretrained(folder)
    return folder


def bert_family(kind: str, tiny_bert_dir: Path, folder: Path, layers: int = 2) -> Path:
    """A tiny random encoder of ``kind`` (distilbert, roberta, electra, mpnet, deberta-v2) with the tiny BERT's tokenizer."""
    import shutil

    import torch
    from transformers import (
        DebertaV2Config,
        DebertaV2Model,
        DistilBertConfig,
        DistilBertModel,
        ElectraConfig,
        ElectraModel,
        MPNetConfig,
        MPNetModel,
        RobertaConfig,
        RobertaModel,
    )

    vocab = len((tiny_bert_dir / "vocab.txt").read_text().split())
    like = {
        "vocab_size": vocab,
        "hidden_size": 32,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": 128,
    }
    config, cls = {
        "distilbert": (DistilBertConfig(vocab_size=vocab, dim=32, n_layers=layers, n_heads=4, hidden_dim=128), DistilBertModel),
        "roberta": (RobertaConfig(**like, max_position_embeddings=130, pad_token_id=0), RobertaModel),
        "electra": (ElectraConfig(**like, embedding_size=32), ElectraModel),
        # all-mpnet-base-v2's family: a relative-position bias shared by every layer's attention
        "mpnet": (MPNetConfig(**like, max_position_embeddings=130, pad_token_id=0), MPNetModel),
        # DeBERTa-v3's layout: relative positions in buckets, no absolute position embedding
        "deberta-v2": (
            DebertaV2Config(
                **like, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"], position_biased_input=False
            ),
            DebertaV2Model,
        ),
    }[kind]
    shutil.copytree(tiny_bert_dir, folder)
    torch.manual_seed(0)
    cls(config).save_pretrained(folder)
    return folder


def terminate_when_started(args: list[str], folder: Path, prefix: str, settle: float = 3.0) -> tuple[int, str]:
    """Run ``python -m slimline.cli ARGS``, send SIGTERM once a hidden ``prefix`` folder appears in
    ``folder`` (and ``settle`` seconds more, well inside its compute); return (exit code, stderr)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "slimline.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(prefix) for p in folder.iterdir()):
        time.sleep(0.2)
    time.sleep(settle)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err
