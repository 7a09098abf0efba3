"""Offline T5 tokenizer loading and the release's prompt / caption pipeline (SPEC §6.3, §7.1).

The tokenizers are built in the test: a tiny sentencepiece model trained on the fly (T5 ids: pad 0, eos 1, unk 2) and
a `tokenizers` tokenizer.json with T5's pre-tokenizer over the same pieces. References: sentencepiece's own ids, and
transformers' ``AutoTokenizer`` on the same folder (what the release calls).
"""

import io
import json
import random

import numpy as np
import pytest

from infstar_jax.text import prompts
from infstar_jax.text.tokenizer import load_tokenizer

pytestmark = pytest.mark.text

WORDS = (
    "the a cat dog runs jumps over lazy quick brown fox video camera close-up big objects scale detail emphasize "
    "slowly city night light red blue green ocean waves mountain sky"
).split()
TEXTS = [
    "<<<t=5s>>>the quick brown fox runs, Close-up on big objects, emphasize scale and detail",
    "  two   spaces  and\ttabs ",
    "",
    "Unseen Zebra ÄÖ 123 letters",
    "the cat jumps. the dog runs. the sky is blue.",
]


def train_spiece(folder, seed=0, vocab_size=60):
    """Writes folder/spiece.model: a unigram sentencepiece model with T5's special ids."""
    import sentencepiece as spm

    rnd = random.Random(seed)
    lines = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 15))) + "." for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", character_coverage=1.0, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))


def write_tokenizer_json(folder, sp, model_max_length):
    """A T5-style tokenizer.json (Unigram over sp's pieces, WhitespaceSplit + Metaspace, '$A </s>') + config."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", sp.eos_id())]
    )
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length, "extra_ids": 0,
              "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spiece")
    return folder, train_spiece(folder)


@pytest.fixture(scope="module")
def tokjson_dir(tmp_path_factory, spiece_dir):
    folder = tmp_path_factory.mktemp("tokjson")
    write_tokenizer_json(folder, spiece_dir[1], model_max_length=24)
    return folder


def test_sentencepiece_ids_are_spm_plus_eos(spiece_dir):
    folder, sp = spiece_dir
    tok = load_tokenizer(folder)
    assert (tok.pad_id, tok.eos_id, tok.max_length) == (0, 1, 512)
    assert tok.source.endswith("spiece.model")
    for text in TEXTS:
        assert tok.tokenize([text]) == [sp.encode(text, out_type=int) + [1]], text


def test_sentencepiece_truncation_and_padding(spiece_dir):
    folder, sp = spiece_dir
    tok = load_tokenizer(folder, max_length=8)
    long_text = " ".join(WORDS)
    pieces = sp.encode(long_text, out_type=int)
    assert len(pieces) > 8
    assert tok.tokenize([long_text]) == [pieces[:7] + [1]]
    ids, mask = tok(["the cat", long_text, ""])  # no buckets: pad to max_length like padding='max_length'
    assert ids.shape == mask.shape == (3, 8) and ids.dtype == np.int32
    short = sp.encode("the cat", out_type=int) + [1]
    np.testing.assert_array_equal(ids[0], short + [0] * (8 - len(short)))
    np.testing.assert_array_equal(mask.sum(1), [len(short), 8, 1])
    np.testing.assert_array_equal(ids[2], [1] + [0] * 7)
    ids, mask = tok(["the cat", ""], buckets=(2, 3, 5, 8))
    want = min(b for b in (2, 3, 5, 8) if b >= len(short))
    assert ids.shape == (2, want) and (ids * (1 - mask) == 0).all()
    np.testing.assert_array_equal(mask.sum(1), [len(short), 1])


def test_tokenizer_json_matches_transformers_autotokenizer(tokjson_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(tokjson_dir), legacy=True)
    tok = load_tokenizer(tokjson_dir)
    assert tok.source.endswith("tokenizer.json") and tok.max_length == 24  # from tokenizer_config.json
    texts = TEXTS + [" ".join(WORDS * 2), "x </s> y"]
    want = ref(texts, max_length=24, padding="max_length", truncation=True)
    ids, mask = tok(texts)
    np.testing.assert_array_equal(ids, np.array(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(want["attention_mask"]))


def test_backend_choice(spiece_dir, tokjson_dir, tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    (both / "spiece.model").write_bytes((spiece_dir[0] / "spiece.model").read_bytes())
    (both / "tokenizer.json").write_bytes((tokjson_dir / "tokenizer.json").read_bytes())
    assert load_tokenizer(both).source.endswith("tokenizer.json")  # as AutoTokenizer does
    assert load_tokenizer(both, backend="sentencepiece").source.endswith("spiece.model")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor spiece.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown tokenizer backend"):
        load_tokenizer(both, backend="bpe")
    with pytest.raises(TypeError, match="single str"):
        load_tokenizer(both).tokenize("a str")


# --- prompts (SPEC §6.3) ------------------------------------------------------------------------------------------


def test_inference_prompt_is_release_string():
    p = prompts.inference_prompt("A cat surfs a wave")
    assert p == "<<<t=5s>>>A cat surfs a wave, Close-up on big objects, emphasize scale and detail"
    assert prompts.inference_prompt("x", duration=10, quality_suffix=" hq") == "<<<t=10s>>>x hq"
    assert prompts.inference_prompt("x", duration=None, quality_suffix=None) == "x"
    assert prompts.duration_prefix(np.int64(5)) == "<<<t=5s>>>" == prompts.duration_prefix(5.0)
    for bad in (2.5, -1, "5", True):
        with pytest.raises(ValueError, match="whole number of seconds"):
            prompts.duration_prefix(bad)


def test_pad_to_bucket_and_keep_first_rows():
    seqs = [[5, 6, 1], [7, 1], [1]]
    ids, mask = prompts.pad_to_bucket(seqs, (2, 4, 8), pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 1, 0], [7, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    with pytest.raises(ValueError, match="longer than the largest bucket 2"):
        prompts.pad_to_bucket(seqs, (2,))
    feats = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
    lengths = mask.sum(1)
    rows = prompts.keep_first_rows(feats, lengths)
    assert [r.shape for r in rows] == [(3, 2), (2, 2), (1, 2)]
    kv, cu = prompts.kv_compact(feats, lengths)
    np.testing.assert_array_equal(cu, [0, 3, 5, 6])
    np.testing.assert_array_equal(kv, np.concatenate([feats[0, :3], feats[1, :2], feats[2, :1]]))


# --- training captions (SPEC §7.1) ------------------------------------------------------------------------------


def test_truncate_sentences():
    assert prompts.truncate_sentences("A cat. A dog. Sky.", 2) == "A cat. A dog."
    assert prompts.truncate_sentences("A cat.. Sky", 1) == "A cat."  # empty pieces are dropped, '.' re-added
    rng = np.random.default_rng(0)
    assert prompts.random_drop_sentences("One sentence only.", rng) == "One sentence only."
    assert rng.random() == np.random.default_rng(0).random()  # nothing was drawn for a 1-sentence caption


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_caption_rule(seed):
    caption = "A cat walks. It sits down. The sun sets. Birds fly"
    n = 4
    # Deterministic corners.
    never = prompts.training_caption(caption, 5, np.random.default_rng(seed), short_prob=0.0, quality_prompt="HQ")
    assert never == "<<<t=5s>>>" + caption + " HQ"
    assert prompts.training_caption(caption, None, np.random.default_rng(seed), dynamic_length=False) == caption
    # With probability 1, k is drawn from 1..n by the (separate) sentence generator.
    ks = []
    for i in range(400):
        out = prompts.training_caption(caption, 3, np.random.default_rng(seed), short_prob=1.0,
                                       sentence_rng=np.random.default_rng([seed, i]))
        assert out.startswith("<<<t=3s>>>") and out.endswith(".")
        body = out[len("<<<t=3s>>>"):]
        k = body.count(".")
        assert body == prompts.truncate_sentences(caption, k)
        assert k == int(np.random.default_rng([seed, i]).integers(1, n + 1))
        ks.append(k)
    counts = np.bincount(ks, minlength=n + 1)[1:]
    assert counts.min() > 400 / n * 0.6  # every k in 1..n occurs, roughly uniformly
    # The truncation probability is short_prob.
    rng = np.random.default_rng(seed)
    outs = [prompts.training_caption(caption, None, rng, short_prob=0.3) for _ in range(2000)]
    frac = np.mean([o != caption for o in outs])
    # Every truncation changes this caption (even k = n appends a final '.').
    assert abs(frac - 0.3) < 0.05, frac
    with pytest.raises(ValueError, match="empty caption"):
        prompts.training_caption("", 5, rng)
