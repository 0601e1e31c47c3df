"""Tiny offline tokenizers (Llama-3-, Mistral-, Gemma-2- and Qwen-style) for data-pipeline tests."""
import functools
import pathlib

from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import PreTrainedTokenizerFast

TEMPLATES = pathlib.Path(__file__).resolve().parent / "templates"

CORPUS = [
    "hello world how are you today", "the quick brown fox jumps over the lazy dog",
    "Human: what is the capital of France? Assistant: Paris is the capital.",
    "I am fine thank you very much for asking", "numbers 12345 and symbols !?.,;:",
] * 20

# Written for these tests in the style of Meta's Llama-3-Instruct template (no "system" text, BOS in the
# template, every turn closed by <|eot_id|>).
LLAMA3_TEMPLATE = (
    "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def _bpe(special: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@functools.lru_cache(maxsize=None)
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(special), bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


@functools.lru_cache(maxsize=None)
def mistral_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(["<unk>", "<s>", "</s>"]), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def template_text(name: str) -> str:
    """A chat template of tests/templates/ (the models' own, byte for byte)."""
    return (TEMPLATES / name).read_text()


@functools.lru_cache(maxsize=None)
def gemma2_tokenizer() -> PreTrainedTokenizerFast:
    """gemma-2-9b-it's special tokens (ids 0-3 as in the real vocabulary) and its own chat template."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(special), bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = template_text("gemma2.jinja")
    return tok


@functools.lru_cache(maxsize=None)
def qwen_tokenizer(template: str) -> PreTrainedTokenizerFast:
    """Qwen2.5-Instruct / Qwen3's special tokens: no BOS, EOS <|im_end|>, pad <|endoftext|>; <think> and </think>
    are ordinary added tokens (as in Qwen3's vocabulary)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = template_text(template)
    return tok
