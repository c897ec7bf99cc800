"""The tiny GLM-style tokenizer shipped with glmserve (tiny_assets/), and the script that made it.

The assets are committed so tests and the built-in tiny model never retrain; `regenerate_tiny_assets()`
rebuilds tokenizer.json and tokenizer_config.json from `train_tiny_tokenizer()`, which is deterministic.
chat_template.jinja is hand written and is not touched by the generator.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

# resolve(): an editable install links this file from a build tree that lacks the data folder.
TINY_ASSETS_DIR = Path(__file__).resolve().with_name("tiny_assets")
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TINY_VOCAB_SIZE = 1000

# Control tokens GLM-4.5/4.7 mark `special: true`: decode(skip_special_tokens=True) drops them.
SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>", "<|end_of_transcription|>",
)
# Added tokens GLM keeps `special: false`: they survive skip_special_tokens, so the reasoning and
# tool-call parsers see them in the decoded text.
MARKUP_TOKENS = (
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink",
    "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>",
)
# Same roles as the real eos ids 151329 / 151336 / 151338: end of text, and the two turn starts a
# reply must never run into.
EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 131072

# Pre-split like GLM's tokenizer.json (a cl100k-style regex, digits in runs of at most 3), then bytes.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not but which "
    "you they we his her their one all there can more were has been when will would what about so if "
    "out up into them some time only other then its also two how than first new very after most "
    "model token tokens server request response prompt cache block batch decode prefill layer expert "
    "router weight tensor kernel memory latency throughput stream stop string output input value key "
    "function tool call result weather city temperature today tomorrow question answer think reason "
    "because therefore number list file path error return true false none null name type object array "
    "hello world please thanks good great small large fast slow simple test check run build start end "
    "user assistant system message content chat history turn reply search query data text line word"
).split()
_CODE = (
    "def return import from class self None True False if else elif for while in print len range "
    "{ } ( ) [ ] : ; , . = == != + - * / -> => && || < > <= >= \" ' # // /* */ _ __init__ async await "
    "json dict list str int float args kwargs lambda yield try except raise with as"
).split()
# Common CJK characters and a few other scripts, so multi-byte merges exist in the vocab.
_CJK = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单坐"
_OTHER = "éèàçüöäßñ αβγδ λμπσ привет мир こんにちは ありがとう 안녕하세요 😀🚀✨👍"


def tiny_corpus(seed: int = 0, n_lines: int = 3000) -> list[str]:
    """Deterministic training text: English-ish sentences, code-ish lines, JSON, CJK and numbers."""
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(n_lines):
        kind = i % 5
        if kind in (0, 1):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
            words[0] = words[0].capitalize()
            lines.append(" ".join(words) + rng.choice(".?!,:") + ("\n" if rng.random() < 0.3 else ""))
        elif kind == 2:
            lines.append(" ".join(rng.choice(_CODE) for _ in range(rng.randint(4, 10))) + "\n    ")
        elif kind == 3:
            obj = {rng.choice(_WORDS): rng.choice([rng.randint(0, 9999), rng.choice(_WORDS), True, None])
                   for _ in range(rng.randint(1, 3))}
            lines.append(json.dumps(obj, ensure_ascii=False))
        else:
            cjk = "".join(rng.choice(_CJK) for _ in range(rng.randint(4, 16)))
            lines.append(cjk + rng.choice("，。？！") + " " + str(rng.randint(0, 100000)))
    lines.extend([_OTHER] * 20)
    return lines


def train_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE):
    """Train the byte-level BPE and append GLM's added tokens after the learned vocab, as GLM does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    n_added = len(SPECIAL_TOKENS) + len(MARKUP_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size - n_added:
        raise RuntimeError(f"corpus too small: learned {tok.get_vocab_size()} of {vocab_size - n_added} tokens")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return tok


def tiny_tokenizer_config(tok) -> dict:
    """tokenizer_config.json for transformers: class, named specials, and the added-token table."""
    decoder = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "extra_special_tokens": list(SPECIAL_TOKENS),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": EOS_TOKENS[0],
        "pad_token": PAD_TOKEN,
        "padding_side": "left",
        "remove_space": False,
        "model_max_length": MODEL_MAX_LENGTH,
    }


def regenerate_tiny_assets(out_dir: Path = TINY_ASSETS_DIR) -> None:
    """Rewrite tokenizer.json and tokenizer_config.json (run after changing this file)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer()
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    config = json.dumps(tiny_tokenizer_config(tok), indent=2, ensure_ascii=False)
    (out_dir / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")


@dataclass(frozen=True)
class TinyTokenizerInfo:
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    bos_token_id: int | None


def tiny_tokenizer_info(asset_dir: Path = TINY_ASSETS_DIR) -> TinyTokenizerInfo:
    """Ids the model config must agree with, read from the shipped tokenizer.json."""
    data = json.loads((Path(asset_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in data["added_tokens"]}
    size = max(max(data["model"]["vocab"].values()), max(ids.values())) + 1
    # GLM has no bos token: the chat template writes [gMASK]<sop> itself.
    return TinyTokenizerInfo(vocab_size=size, eos_token_ids=tuple(ids[t] for t in EOS_TOKENS),
                             pad_token_id=ids[PAD_TOKEN], bos_token_id=None)


def write_tiny_tokenizer(out_dir: Path) -> TinyTokenizerInfo:
    """Copy the three tokenizer files into out_dir (a model directory) and describe them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ASSET_FILES:
        shutil.copyfile(TINY_ASSETS_DIR / name, out_dir / name)
    return tiny_tokenizer_info(out_dir)


if __name__ == "__main__":
    regenerate_tiny_assets()
