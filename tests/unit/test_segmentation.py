"""Segmentation rules, exact coverage, and token alignment with a real fast tokenizer."""

from __future__ import annotations

import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twodrl import synthetic
from twodrl.segmentation import (
    align_segments,
    batch_segment_ids,
    segment_spans,
    segment_text,
    segment_token_counts,
    stripped_segments,
    token_segment_ids,
)

# The response of the 2D-DPO paper's Figure 7 (rebuilt from the extracted text; the
# comment lines of the script lost their "//" in the extraction). The figure rates it
# as 14 segments, the server script as four chunks.
FIGURE7 = """To customize the code to send your jump count to other players that also have the Weak Aura, you will need to modify the code to store the jump count in a shared data store. One option could be to use a database or a server-side scripting language to store and manage the data.
Here is one example of how you could modify the code to send the jump count to other players:

1. First, update the onJump function to store the jump count in a variable that is accessible to other players:
```
var jumpCount = 0;
function onJump() {
  jumpCount++;
}
```
2. Next, create a server-side script that can retrieve the jump count from the database or other data store:
```
// Assuming you are using Node.js or another server-side language
var http = require('http');
var queryString = require('query-string');

// Connect to the database
var db = new mysql('localhost', 'username', 'password', 'database_name');

// Retrieve the jump count from the database
http.get('http://yourdomain.com/getJumpCount', function (response, body) {
  var params = queryString.parse(body);
  var jumpCount = params.jumpCount;

  // Update the jump count in the database or other data store
  db.query("UPDATE players SET jumpCount = jumpCount + " + jumpCount + " WHERE username = 'yourusername'", function (error, results, fields) {
    if (error) throw error;
  });
});
```
3. Finally, modify the HTML to include a form that allows players to submit their jump count:
```
<form action="http://yourdomain.com/sendJumpCount" method="POST">
  <label for="jumpCount">Jump count:</label>
  <input type="number" name="jumpCount" id="jumpCount">
  <input type="submit" value="Send">
</form>
```
This code uses a server-side script to retrieve the jump count from the database or other data store and update the jump count for the player with the Weak Aura. You can modify the database query to update the jump count for specific players or to store the jump count in a different data store."""

# How each of the 14 segments of the figure begins and ends.
FIGURE7_SEGMENTS = [
    ("To customize the code", "in a shared data store."),
    ("One option could be", "store and manage the data."),
    ("Here is one example", "to other players:"),
    ("1. First, update the onJump", "accessible to other players:"),
    ("```\nvar jumpCount = 0;", "jumpCount++;\n}\n```"),
    ("2. Next, create a server-side script", "or other data store:"),
    ("```\n// Assuming you are using Node.js", "require('query-string');"),
    ("// Connect to the database", "'database_name');"),
    ("// Retrieve the jump count", "var jumpCount = params.jumpCount;"),
    ("// Update the jump count in the database", "  });\n});\n```"),
    ("3. Finally, modify the HTML", "submit their jump count:"),
    ('```\n<form action="http://yourdomain.com/sendJumpCount"', "</form>\n```"),
    ("This code uses a server-side script", "with the Weak Aura."),
    ("You can modify the database query", "in a different data store."),
]


def test_figure7_response_splits_like_the_paper():
    segs = stripped_segments(FIGURE7)
    assert len(segs) == 14, segs
    for k, (seg, (head, tail)) in enumerate(zip(segs, FIGURE7_SEGMENTS)):
        assert seg.startswith(head), (k, seg)
        assert seg.endswith(tail), (k, seg)
    assert "".join(segment_text(FIGURE7)) == FIGURE7


def test_figure7_code_blocks_whole_when_asked():
    segs = stripped_segments(FIGURE7, split_code_paragraphs=False)
    assert len(segs) == 11  # the server script is one segment instead of four
    assert segs[6].startswith("```\n// Assuming") and segs[6].endswith("});\n});\n```")


# ---------------------------------------------------------------- sentence rules


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Pi is 3.14 exactly. Next one.", ["Pi is 3.14 exactly.", "Next one."]),
        ("Dr. Smith and Mr. Jones met. They talked.", ["Dr. Smith and Mr. Jones met.", "They talked."]),
        ("Use tools, e.g. a hammer, i.e. something. Done.", ["Use tools, e.g. a hammer, i.e. something.", "Done."]),
        ("J. K. Rowling wrote it. The U.S. Army agreed.", ["J. K. Rowling wrote it.", "The U.S. Army agreed."]),
        ("A book by J. K. Rowling. Fine.", ["A book by J. K. Rowling.", "Fine."]),
        ("The answer is B. Take vitamin C. It helps.", ["The answer is B.", "Take vitamin C.", "It helps."]),
        ("The answer is no. Then stop.", ["The answer is no.", "Then stop."]),
        ("Count 1...10 slowly. Then stop.", ["Count 1...10 slowly.", "Then stop."]),
        ("Really?! Yes. Wow!", ["Really?!", "Yes.", "Wow!"]),
        ("Wait... what? Well… Fine.", ["Wait... what?", "Well…", "Fine."]),
        ('He said "stop." Then he left.', ['He said "stop."', "Then he left."]),
        ("(See the note.) It matters.", ["(See the note.)", "It matters."]),
        ("It costs approx. five euros. OK.", ["It costs approx. five euros.", "OK."]),
        ("Call `obj.run(). Later` now. Next.", ["Call `obj.run(). Later` now.", "Next."]),
        ("Version 2.0.1 is out. Get it at example.com/a.b today.", ["Version 2.0.1 is out.", "Get it at example.com/a.b today."]),
        ("no punctuation at all", ["no punctuation at all"]),
        ("It happened in 2020. Then it ended.", ["It happened in 2020.", "Then it ended."]),
    ],
)
def test_sentence_rules(text, expected):
    assert stripped_segments(text) == expected


def test_lists_each_item_starts_a_segment():
    text = "Steps:\n1. Open the box. Take it out.\n2. Plug it in\n- a dash item\n* a star item\n+ a plus item\n   10. indented item"
    assert stripped_segments(text) == [
        "Steps:",
        "1. Open the box.",
        "Take it out.",
        "2. Plug it in",
        "- a dash item",
        "* a star item",
        "+ a plus item",
        "10. indented item",
    ]


def test_code_block_kept_whole_despite_punctuation():
    text = "Run this:\n```python\nx = 1. \nprint('Hi. There!')\ny = 3.5\n```\nIt prints. Done."
    assert stripped_segments(text) == [
        "Run this:",
        "```python\nx = 1. \nprint('Hi. There!')\ny = 3.5\n```",
        "It prints.",
        "Done.",
    ]


def test_code_block_chunks_and_fence_variants():
    text = "~~~\na = 1\n\n\nb = 2\n~~~\n````\n```\ninner. Fence.\n````\nEnd."
    assert stripped_segments(text) == ["~~~\na = 1", "b = 2\n~~~", "````\n```\ninner. Fence.\n````", "End."]
    # A blank line right after the opening or before the closing fence is no chunk.
    assert stripped_segments("```\n\ncode\n\n```") == ["```\n\ncode\n\n```"]


def test_unclosed_fence_runs_to_the_end():
    text = "Here:\n```js\nlet a = 1. b = 2. \nstill code"
    assert stripped_segments(text) == ["Here:", "```js\nlet a = 1. b = 2. \nstill code"]


def test_table_rows_whole_and_delimiter_joins_header():
    text = "Results:\n| Name | Note |\n|:---|---:|\n| Dr. A | Fine. Good! |\n| B | 3.5 ok? yes. |\nThat is all."
    assert stripped_segments(text) == [
        "Results:",
        "| Name | Note |\n|:---|---:|",
        "| Dr. A | Fine. Good! |",
        "| B | 3.5 ok? yes. |",
        "That is all.",
    ]


def test_cjk_sentences():
    text = "你好。我是学生！你呢？“好的。”他说。等一下……再见"
    assert stripped_segments(text) == ["你好。", "我是学生！", "你呢？", "“好的。”", "他说。", "等一下……", "再见"]
    mixed = "東京は大きい。Tokyo is big. 大阪も！"
    assert stripped_segments(mixed) == ["東京は大きい。", "Tokyo is big.", "大阪も！"]


def test_whitespace_attaches_to_the_preceding_segment():
    text = "  First one.   Second one.\n\n  Third.  \n"
    assert segment_text(text) == ["  First one.   ", "Second one.\n\n  ", "Third.  \n"]
    assert segment_spans(text) == [(0, 15), (15, 30), (30, 39)]


def test_blank_text_has_no_segments():
    assert segment_text("") == []
    assert segment_text(" \n\t ") == []
    assert segment_spans("\n") == []


# ---------------------------------------------------------------- properties

ALPHABET = list("abcXYZ 019") + [".", "!", "?", "…", "。", "！", "？", "\n", "\n\n", "\t", "`", "```", "|", "-", "* ", "1. ", "e.g.", "Dr.", "你", '"', ")"]
texts = st.lists(st.sampled_from(ALPHABET), max_size=80).map("".join) | st.text(max_size=120)


@settings(max_examples=400, deadline=None)
@given(texts)
def test_segments_cover_the_text_exactly(text):
    spans = segment_spans(text)
    segs = segment_text(text)
    if not text.strip():
        assert spans == [] and segs == []
        return
    assert "".join(segs) == text
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (a, b), (c, _) in zip(spans, spans[1:]):
        assert a < b == c  # monotone, contiguous, non-empty
    for k, seg in enumerate(segs):
        assert seg.strip(), "no whitespace-only segment"
        if k:
            assert not seg[0].isspace(), "whitespace belongs to the segment before"
    assert stripped_segments(text) == [s.strip() for s in segs]
    # Aligning the display form back onto the text recovers the same spans.
    assert align_segments(text, stripped_segments(text)) == spans


@settings(max_examples=200, deadline=None)
@given(texts, st.booleans())
def test_code_option_never_changes_coverage(text, split_code):
    segs = segment_text(text, split_code_paragraphs=split_code)
    assert "".join(segs) == (text if text.strip() else "")


# ---------------------------------------------------------------- align_segments


def test_align_stripped_and_collapsed_segments():
    text = "Hello there.  How are\n you?\n\nFine."
    spans = align_segments(text, ["Hello there.", "How are you?", "Fine."])  # newline collapsed
    assert spans == [(0, 14), (14, 29), (29, 34)]
    assert [text[a:b] for a, b in spans] == ["Hello there.  ", "How are\n you?\n\n", "Fine."]


def test_align_errors_name_the_segment():
    with pytest.raises(ValueError, match=r"segment 1 \('Missing'\) does not match the text at char 7"):
        align_segments("Hello. World.", ["Hello.", "Missing", "World."])
    with pytest.raises(ValueError, match="text after the last segment"):
        align_segments("Hello. World.", ["Hello."])
    with pytest.raises(ValueError, match="segment 0 is empty"):
        align_segments("Hello.", ["  "])
    with pytest.raises(ValueError, match="not found"):
        align_segments("Hello. World.", ["Hello.", "Nope"], strict=False)


def test_align_non_strict_absorbs_uncovered_text():
    text = "- Hello. World. Extra."
    spans = align_segments(text, ["Hello.", "World."], strict=False)
    assert spans == [(0, 9), (9, len(text))]  # "- " joins the first, " Extra." the last


# ---------------------------------------------------------------- synthetic task


def _old_split_sentences(response: str) -> list[str]:
    """The synthetic task's splitter before it moved onto the general segmenter."""
    parts = re.findall(r"[^.!?]+[.!?]+|[^.!?]+$", response.strip())
    return [p.strip() for p in parts if p.strip()]


def test_synthetic_split_uses_the_segmenter_and_keeps_its_behaviour():
    rng = random.Random(0)
    for _ in range(500):
        text = synthetic.sample_response(rng, rng.choice(sorted(synthetic.ANIMALS)))
        assert synthetic.split_sentences(text) == _old_split_sentences(text) == stripped_segments(text)
    for sentence in synthetic.corpus():
        assert synthetic.split_sentences(sentence) == [sentence]


# ---------------------------------------------------------------- token alignment


@pytest.fixture(scope="module", params=[False, True], ids=["untrimmed", "trimmed"])
def fast_tokenizer(request):
    """A byte-level BPE tokenizer trained here on a few sentences (no downloads),
    wrapped as a transformers fast tokenizer; offsets with and without the leading
    space trimmed (both conventions exist among released tokenizers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=request.param)
    corpus = list(synthetic.corpus()) + FIGURE7.splitlines() + ["你好。我是学生！", "| a | b |", "```python", "User: Assistant:"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _reference_ids(offsets, base, spans, response):
    """Per-token loop with the documented rule, to check the vectorized one."""
    n = len(response)
    out = []
    for s, e in offsets:
        if e == s > 0:
            s -= 1  # a trimmed space token covers the character before
        lo, hi = max(s - base, 0), min(e - base, n)
        if e <= s or hi <= lo:
            out.append(-1)
            continue
        anchor = next((i for i in range(lo, hi) if not response[i].isspace()), lo)
        out.append(max(k for k, (a, _) in enumerate(spans) if a <= anchor or k == 0))
    return out


RESPONSES = [
    "The otter lives in rivers. The otter eats fish!  Is it brown?\n\nYes.",
    FIGURE7,
    "你好。我是学生！ OK then.",
    "Plan:\n| a | b |\n|---|---|\n| 1. x | 2 |\n- item one. More.\n",
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_segment_ids_with_a_real_tokenizer(fast_tokenizer, padding_side):
    tok = fast_tokenizer
    tok.padding_side = padding_side
    prompts = ["User: Tell me about the otter.\nAssistant: ", "User: help\nAssistant:", "Q: 你好\nA: ", "User: table?\nAssistant: "]
    rendered = [p + r + "<eos>" for p, r in zip(prompts, RESPONSES)]
    enc = tok(rendered, return_offsets_mapping=True, padding=True, return_tensors="pt")
    spans = [segment_spans(r) for r in RESPONSES]
    starts = [len(p) for p in prompts]
    ids = batch_segment_ids(enc["offset_mapping"], starts, spans, RESPONSES, enc["attention_mask"])
    assert ids.shape == enc["input_ids"].shape and ids.dtype == torch.long

    for b, response in enumerate(RESPONSES):
        offsets = enc["offset_mapping"][b].tolist()
        mask = enc["attention_mask"][b].tolist()
        row = ids[b].tolist()
        base, end = starts[b], starts[b] + len(response)
        expected = _reference_ids(offsets, base, spans[b], response)
        expected = [x if m else -1 for x, m in zip(expected, mask)]
        assert row == expected
        for (s, e), m, seg in zip(offsets, mask, row):
            s = s - 1 if e == s > 0 else s
            in_response = m and e > s and s < end and e > base
            assert (seg >= 0) == bool(in_response), (s, e, seg)  # exactly the response tokens
            if not m or e <= base or s >= end:
                assert seg == -1  # padding, prompt, <eos>
        # Response tokens in order: ids never go back, every segment gets tokens.
        resp_ids = [x for x in row if x >= 0]
        assert resp_ids == sorted(resp_ids)
        counts = segment_token_counts(ids[b], len(spans[b]))
        assert (counts > 0).all(), counts
        assert int(counts.sum()) == len(resp_ids)
        # The tokens of each segment decode back to that segment's text.
        for k, (a, z) in enumerate(spans[b]):
            toks = enc["input_ids"][b][ids[b] == k]
            assert tok.decode(toks).strip() == response[a:z].strip()

    # The single-sequence helper agrees with the batch helper.
    b = 0
    single = token_segment_ids(enc["offset_mapping"][b].tolist(), spans[b], offset_base=starts[b], text=RESPONSES[b])
    masked = [x if m else -1 for x, m in zip(single, enc["attention_mask"][b].tolist())]
    assert masked == ids[b].tolist()


def test_straddling_and_whitespace_tokens():
    response = "Hi there. Next one.\n\nLast."
    spans = segment_spans(response)  # "Hi there. " | "Next one.\n\n" | "Last."
    base = 5  # "User:" precedes it
    rel = [(0, 2), (2, 8), (8, 9), (9, 14), (14, 18), (18, 19), (19, 21), (21, 26)]
    offsets = [(0, 0), (0, 5)] + [(a + base, b + base) for a, b in rel] + [(31, 36), (0, 0)]
    ids = token_segment_ids(offsets, spans, offset_base=base, text=response)
    # BOS, prompt | "Hi" " there" "." " Next"→1 " one" "." "\n\n"→1 "Last." | "<eos>", pad
    assert ids == [-1, -1, 0, 0, 0, 1, 1, 1, 1, 2, -1, -1]
    # ". Next" starts with a non-space character of the first segment, so it stays
    # there; "\n\nLast." goes where its word starts.
    merged = [(0, 2), (2, 8), (8, 14), (14, 19), (19, 26)]
    assert token_segment_ids(merged, spans, text=response) == [0, 0, 0, 1, 2]
    # A lone space token whose offsets were trimmed to zero width just before "Next"
    # covers the space, which belongs to the first segment.
    assert token_segment_ids([(15, 15)], spans, offset_base=base, text=response) == [0]
    # A token that straddles the prompt/response boundary is a response token.
    assert token_segment_ids([(3, 7)], spans, offset_base=5, text=response) == [0]
    # Without the text, the token's last character decides (exact for " Next").
    assert token_segment_ids([(9, 14), (19, 21)], spans) == [1, 1]


def test_batch_segment_ids_vectorized_matches_reference_on_random_offsets():
    rng = random.Random(1)
    for _ in range(50):
        response = "".join(rng.choice(["Ab. ", "cd! ", "\n", "e", "  ", "你。", "x"]) for _ in range(rng.randint(1, 30)))
        spans = segment_spans(response)
        if not spans:
            continue
        base = rng.randint(0, 5)
        cuts = sorted({0, len(response) + base + 3, *rng.sample(range(1, len(response) + base + 3), k=min(8, len(response)))})
        offsets = list(zip(cuts[:-1], cuts[1:])) + [(0, 0)]
        got = token_segment_ids(offsets, spans, offset_base=base, text=response)
        assert got == _reference_ids(offsets, base, spans, response)


def test_empty_response_gives_all_minus_one():
    ids = batch_segment_ids(torch.tensor([[[0, 3], [3, 5]]]), [5], [[]], [""])
    assert ids.tolist() == [[-1, -1]]
    with pytest.raises(ValueError, match="shape"):
        batch_segment_ids(torch.zeros(2, 3), [0, 0], [[], []])


def test_non_space_positions_agree_with_str_isspace_on_every_code_point():
    from twodrl.segmentation import non_space_positions

    text = "".join(map(chr, range(0x110000)))
    expected = [i for i, m in enumerate(text) if not m.isspace()]
    assert non_space_positions(text).tolist() == expected
