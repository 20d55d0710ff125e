"""Tokenizer parity: our CLIP BPE ids equal open_clip's and transformers' on a varied prompt corpus."""

import itertools
import json

import numpy as np
import pytest

from hps_jax.data.tokenizer import BPE_FILENAME, CLIPTokenizer, default_bpe_path


def _corpus() -> list[str]:
  subjects = [
    "a cat",
    "an astronaut riding a horse",
    "the Eiffel Tower",
    "two dogs playing chess",
    "a bowl of ramen",
    "a cyberpunk city",
    "an old man's portrait",
    "a red sports car",
    "a castle on a hill",
    "a robot",
    "a bustling Tokyo street at night",
    "the Mona Lisa wearing sunglasses",
    "a tiny dragon in a teacup",
    "an isometric village",
    "a watercolor fox",
    "a steampunk airship over London",
  ]
  styles = [
    "",
    ", oil painting",
    ", trending on artstation, 8k",
    " in the style of Van Gogh",
    ", highly detailed, sharp focus, (masterpiece:1.2)",
    " -- photorealistic, 35mm f/1.8",
    ", Studio Ghibli!!!",
    " | unreal engine | octane render",
  ]
  templates = ["{s}{t}", "A photo of {s}{t}", "{S}{t}", "   {s}\t{t}\n"]
  corpus = []
  for (s, t), tpl in zip(itertools.product(subjects, styles), itertools.cycle(templates)):
    corpus.append(tpl.format(s=s, S=s.upper(), t=t))
  long_words = " ".join(f"word{i}" for i in range(120))
  corpus += [
    "",
    " ",
    "\n\t ",
    ".",
    "!!!???",
    "a",
    "A",
    "I",
    "it's",
    "IT'S",
    "they'll've",
    "we're here, aren't we?",
    "don't stop",
    "rock'n'roll",
    "'quoted'",
    '"double quoted"',
    "1024x768",
    "3.14159",
    "2023-11-23",
    "#hashtag",
    "@user",
    "https://example.com/a?b=c&d=e",
    "e-mail: foo@bar.baz",
    "C++ / C# / F#",
    "100% real",
    "$5 or €5 or ¥5",
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt;",
    "Tom &quot;the cat&quot;",
    "it&#39;s",
    "&amp;amp; double",
    "&nbsp;non-breaking",
    "café",
    "cafe\u0301 (combining accent)",
    "naïve façade",
    "Straße",
    "ÆØÅ æøå",
    "İstanbul",
    "Ελληνικά γράμματα",
    "Русский текст",
    "中文提示词：一只猫",
    "日本語のプロンプト",
    "한국어 문장",
    "العربية",
    "עברית",
    "हिन्दी",
    "ไทย",
    "emoji 😀🐱🚀",
    "flags 🇫🇷🇯🇵",
    "family 👨‍👩‍👧",
    "♥ ★ ☆ ✓",
    "math ∑ ∫ √ ≠ ≤",
    "arrows → ← ↑",
    "cafÃ©",
    "mojibake â€™s",
    "tabs\tand\nnewlines\r\nhere",
    "multiple     spaces",
    "\u00a0nbsp\u00a0inside\u00a0",
    "zero\u200bwidth",
    "soft\u00adhyphen",
    "ＦＵＬＬＷＩＤＴＨ",
    "ligature ﬁne",
    "superscript x² y³",
    "½ ¼ ¾",
    "ALL CAPS PROMPT WITH NUMBERS 123 456",
    "MiXeD CaSe WoRdS",
    "(((best quality))), [[worst]], {weird}",
    "a | b | c",
    "under_score_words",
    "kebab-case-words",
    "...ellipsis...",
    "—em dash— –en dash–",
    "«guillemets» „quotes“",
    "semi;colon:colon",
    "back\\slash",
    "<start_of_text>",
    "<|endoftext|> literal",
    long_words,
    "a " * 80,
    "supercalifragilisticexpialidocious " * 10,
    "x" * 300,
    "1 2 3 4 5 6 7 8 9 0 " * 10,
    "!" * 200,
    "😀" * 40,
  ]
  return corpus


CORPUS = _corpus()


def test_corpus_is_large_and_varied():
  assert len(CORPUS) >= 200
  assert len(set(CORPUS)) == len(CORPUS)
  tok = CLIPTokenizer.default()
  lengths = [len(tok.encode(t)) for t in CORPUS]
  assert min(lengths) == 0 and max(lengths) > 75  # empty and truncated prompts both covered


def _specials_hf(name: str) -> str:
  return {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}.get(name, name)


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
  """A transformers CLIPTokenizer built from the same BPE file, saved the way `save_pretrained` saves it."""
  transformers = pytest.importorskip("transformers")
  ours = CLIPTokenizer.default()
  vocab = {_specials_hf(k): v for k, v in ours.vocab.items()}
  merges = [m for m, _ in sorted(ours.ranks.items(), key=lambda kv: kv[1])]
  hf = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  d = tmp_path_factory.mktemp("hf_tok")
  hf.save_pretrained(d)
  return hf, d


def test_open_clip_parity():
  open_clip_tok = pytest.importorskip("open_clip.tokenizer")
  ref = open_clip_tok.SimpleTokenizer()
  ours = CLIPTokenizer.default()
  want = ref(CORPUS, context_length=77).numpy()
  got = ours(CORPUS, context_length=77)
  assert got.dtype == np.int32 and got.shape == (len(CORPUS), 77)
  bad = [CORPUS[i] for i in np.flatnonzero((got != want).any(1))]
  assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]}"
  # a context other than 77 truncates the same way
  np.testing.assert_array_equal(ours(CORPUS[:50], context_length=16), ref(CORPUS[:50], context_length=16).numpy())


def test_transformers_parity_tokenizer_json(hf_tokenizer_dir):
  hf, d = hf_tokenizer_dir
  ours = CLIPTokenizer.from_hf_dir(d)
  assert ours.clean_name == "hf" and ours.pad_id == hf.pad_token_id
  want = hf(CORPUS, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
  got = ours(CORPUS)
  bad = [CORPUS[i] for i in np.flatnonzero((got != want).any(1))]
  assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]}"


def test_transformers_parity_vocab_and_merges_files(hf_tokenizer_dir, tmp_path):
  """The older / hub layout: vocab.json + merges.txt (with its '#version' header) + special_tokens_map.json."""
  hf, _ = hf_tokenizer_dir
  ours = CLIPTokenizer.default()
  (tmp_path / "vocab.json").write_text(
    json.dumps({_specials_hf(k): v for k, v in ours.vocab.items()}), encoding="utf-8"
  )
  merges = [" ".join(m) for m, _ in sorted(ours.ranks.items(), key=lambda kv: kv[1])]
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
  (tmp_path / "special_tokens_map.json").write_text(
    json.dumps(
      {"bos_token": {"content": "<|startoftext|>"}, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    )
  )
  tok = CLIPTokenizer.from_path(tmp_path / "vocab.json")
  want = hf(CORPUS, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(tok(CORPUS), want)


def test_cleaning_modes_differ_only_where_expected():
  oc = CLIPTokenizer.default()
  hf = CLIPTokenizer.default(clean="hf")
  assert oc("fish &amp; chips")[0].tolist() != hf("fish &amp; chips")[0].tolist()  # HTML unescaped by open_clip only
  np.testing.assert_array_equal(oc("fish & chips"), hf("fish & chips"))
  np.testing.assert_array_equal(oc("A  Photo\tof a CAT"), oc("a photo of a cat"))


def test_truncation_keeps_end_token_and_padding():
  tok = CLIPTokenizer.default()
  ids = tok(["word " * 200, "a cat"])
  assert ids[0, 0] == tok.start_id and ids[0, -1] == tok.end_id and (ids[0, 1:-1] != tok.pad_id).all()
  n = len(tok.encode("a cat")) + 2
  assert ids[1, n - 1] == tok.end_id and (ids[1, n:] == 0).all()
  assert tok(["a cat"], context_length=5).shape == (1, 5)
  assert tok.decode(ids[1]) == "a cat"
  with pytest.raises(ValueError):
    tok("x", context_length=1)
  with pytest.raises(TypeError, match="text 1"):
    tok(["ok", 3])


def test_sources_and_errors(tmp_path, monkeypatch):
  path = default_bpe_path()
  assert path.name == BPE_FILENAME and path.exists()
  monkeypatch.setenv("HPS_JAX_BPE", str(path))
  assert default_bpe_path() == path
  with pytest.raises(FileNotFoundError, match="no such file"):
    CLIPTokenizer.from_path(tmp_path / "nope.txt.gz")
  with pytest.raises(FileNotFoundError, match="no Hugging Face tokenizer"):
    CLIPTokenizer.from_hf_dir(tmp_path)
  bad = tmp_path / "short.txt"
  bad.write_text("#header\nh e\n")
  with pytest.raises(ValueError, match="expected"):
    CLIPTokenizer.from_bpe_file(bad)
