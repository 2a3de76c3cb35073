"""Tiny random-weight checkpoints, made offline with transformers, and a tiny tokenizer.

Shared by the test fixtures (tests/conftest.py) and `make support-matrix`
(scripts/support_matrix.py). Nothing here imports kiln: a checkpoint made here is what a user
would download, only small: 2 layers, hidden 64, a 384-token byte-level BPE vocabulary trained
on English prose that ships with Python.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_VOCAB = 384
# architecture -> (transformers config class name, extra config fields)
TINY_ARCHS = {
    "llama": ("LlamaConfig", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "mistral_window16": ("MistralConfig", {"sliding_window": 16}),  # prompts and decode run past the window
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 24}),  # head_dim != hidden / heads
    "phi3": ("Phi3Config", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 24,
                                    "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "head_dim": 16,
                                     "norm_topk_prob": True, "mlp_only_layers": [1]}),  # layer 1 keeps a dense MLP
}
BERT_ARCHS = ("BertModel", "BertForMaskedLM")  # encoders: make_bert


def english_text() -> str:
    """English prose that ships with Python: the pydoc topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def tiny_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([english_text()[:200_000]], trainer)
    tok.save(str(out / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"}))


def _randomise(model) -> None:
    """Weights large enough that the logits differ meaningfully (the default init is near zero);
    drawn from torch's generator as seeded before the model was made."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)


def make_tiny(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    """A decoder checkpoint of TINY_ARCHS[arch] in out/ (config, safetensors, tokenizer)."""
    import torch
    import transformers

    cls_name, extra = TINY_ARCHS[arch]
    fields = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2,
                  pad_token_id=0)
    cfg = getattr(transformers, cls_name)(**{**fields, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    _randomise(model)
    model.save_pretrained(out)
    tiny_tokenizer(out)
    return out


def make_bert(out: Path, arch: str = "BertModel", seed: int = 0) -> Path:
    """A BERT encoder checkpoint (`arch` one of BERT_ARCHS) with a WordPiece tokenizer in out/."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator([english_text()[:200_000]], trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials,
                                                                                   show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                          sep_token="[SEP]", mask_token="[MASK]")
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    _randomise(model)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out
