"""Data: .txt / JSONL / chat JSONL -> token ids and labels, the held-out split, the errors, the default dataset."""
import json
import math

import pytest

import pelatun_utils as pu

END = "<|im_end|>\n"  # SmolLM2's end-of-turn marker, as rendered by its chat template

TEXT = ("The river bends twice before it reaches the old mill. Children fish from the wooden bridge in summer. "
        "In winter the water freezes at the edges, and the ducks walk on the ice. ") * 6

CHAT = [{"role": "user", "content": "What colour is a ripe lemon?"},
        {"role": "assistant", "content": "A ripe lemon is yellow."}]

TWO_TURNS = [{"role": "system", "content": "Answer in one short sentence."},
             {"role": "user", "content": "How many legs does a spider have?"},
             {"role": "assistant", "content": "A spider has eight legs."},
             {"role": "user", "content": "And an ant?"},
             {"role": "assistant", "content": "An ant has six legs."}]


def write_jsonl(path, records, ensure_ascii=True):
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records), encoding="utf-8")
    return path


def labelled(sample):
    return [t for t, l in zip(sample.ids, sample.labels) if l != -100]


def runs(labels):
    """Contiguous runs of labelled positions, as (start, end) pairs."""
    out, start = [], None
    for i, l in enumerate(labels + [-100]):
        if l != -100 and start is None:
            start = i
        elif l == -100 and start is not None:
            out.append((start, i))
            start = None
    return out


# ---- .txt -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("context_length", [16, 40, 64])
def test_txt_windows(tmp_path, tokenizer, context_length):
    """A .txt file is tokenized whole and cut into windows of at most CONTEXT_LENGTH that add up to it."""
    path = tmp_path / "river.txt"
    path.write_text(TEXT, encoding="utf-8")
    ids = tokenizer(TEXT)["input_ids"]
    assert len(ids) % context_length != 1  # a 1-token tail has nothing to learn and is dropped by design
    samples = pu.load_samples(path, tokenizer, context_length)
    assert len(samples) == math.ceil(len(ids) / context_length) > 1
    assert all(len(s.ids) <= context_length for s in samples)
    assert [t for s in samples for t in s.ids] == ids
    assert all(s.labels == s.ids and not s.chat for s in samples)


def test_txt_one_token_tail_dropped(tmp_path, tokenizer):
    """A last window of a single token has nothing to learn and is dropped; the rest is kept whole."""
    path = tmp_path / "river.txt"
    path.write_text(TEXT, encoding="utf-8")
    ids = tokenizer(TEXT)["input_ids"]
    samples = pu.load_samples(path, tokenizer, len(ids) - 1)
    assert [s.ids for s in samples] == [ids[:-1]]


def test_txt_prompt_is_opening(tmp_path, tokenizer):
    """A text window's prompt is the decoded opening of that window."""
    path = tmp_path / "river.txt"
    path.write_text(TEXT, encoding="utf-8")
    first = pu.load_samples(path, tokenizer, 32)[0]
    assert first.prompt and TEXT.startswith(first.prompt)


# ---- .jsonl with "text" ---------------------------------------------------------------------------

def test_jsonl_text_one_sample_per_line(tmp_path, tokenizer):
    """Short 'text' records give one sample each, in file order, with labels equal to ids."""
    lines = ["The kettle is boiling.", "Our cat sleeps on the windowsill.", "Rain is expected tomorrow."]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in lines])
    samples = pu.load_samples(path, tokenizer, 64)
    assert [s.ids for s in samples] == [tokenizer(t)["input_ids"] for t in lines]
    assert all(s.labels == s.ids and not s.chat for s in samples)


def test_jsonl_text_long_window_and_truncate(tmp_path, tokenizer):
    """A long record gives several windows with 'window' and only the first with 'truncate'."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": TEXT}])
    ids = tokenizer(TEXT)["input_ids"]
    windows = pu.load_samples(path, tokenizer, 32, "window")
    assert len(windows) > 1 and all(len(s.ids) <= 32 for s in windows)
    assert [t for s in windows for t in s.ids] == ids
    truncated = pu.load_samples(path, tokenizer, 32, "truncate")
    assert len(truncated) == 1 and truncated[0].ids == ids[:32] and truncated[0].labels == ids[:32]


def test_jsonl_invalid_long_samples(tmp_path, tokenizer):
    """An unknown LONG_SAMPLES value is refused."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "A short line of text."}])
    with pytest.raises(pu.PelatunError, match="LONG_SAMPLES='cut'.*'window' or 'truncate'"):
        pu.load_samples(path, tokenizer, 32, "cut")


def test_jsonl_unicode_line_separator_inside_string(tmp_path, tokenizer):
    """A U+2028 character inside a JSON string does not end the JSONL line."""
    text = "The first clause\u2028and the second clause."
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": text}], ensure_ascii=False)
    samples = pu.load_samples(path, tokenizer, 64)
    assert [s.ids for s in samples] == [tokenizer(text)["input_ids"]]


# ---- chat JSONL -----------------------------------------------------------------------------------

def test_chat_labels_only_assistant(tmp_path, tokenizer):
    """Chat labels are -100 except the assistant turn, which decodes to its content plus the end-of-turn marker."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    [s] = pu.load_samples(path, tokenizer, 256)
    assert s.ids == tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    assert all(l in (-100, t) for t, l in zip(s.ids, s.labels))
    assert len(runs(s.labels)) == 1
    assert tokenizer.decode(labelled(s)) == CHAT[1]["content"] + END
    assert s.chat and s.prompt == CHAT[0]["content"]


def test_chat_two_turns(tmp_path, tokenizer):
    """Both assistant turns are labelled, neither user turn nor the system prompt."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": TWO_TURNS}])
    [s] = pu.load_samples(path, tokenizer, 256)
    spans = runs(s.labels)
    assert [tokenizer.decode(s.ids[a:b]) for a, b in spans] == [TWO_TURNS[2]["content"] + END,
                                                                TWO_TURNS[4]["content"] + END]
    unlabelled = tokenizer.decode([t for t, l in zip(s.ids, s.labels) if l == -100])
    for m in TWO_TURNS[:2] + TWO_TURNS[3:4]:
        assert m["content"] in unlabelled
    assert s.prompt == "How many legs does a spider have?"


def test_chat_default_system_prompt_unlabelled(tmp_path, tokenizer):
    """The template's default system prompt (no system message given) is never labelled."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    [s] = pu.load_samples(path, tokenizer, 256)
    first = runs(s.labels)[0][0]
    head = tokenizer.decode(s.ids[:first])
    assert "<|im_start|>system\n" in head and head.endswith("<|im_start|>assistant\n")
    assert "system" not in tokenizer.decode(labelled(s))


def test_chat_prompt_is_last_user_before_first_assistant(tmp_path, tokenizer):
    """Sample.prompt is the last user message before the first assistant turn."""
    messages = [{"role": "user", "content": "I have a question."}, {"role": "user", "content": "Is snow cold?"},
                {"role": "assistant", "content": "Yes, snow is cold."}, {"role": "user", "content": "Thanks."},
                {"role": "assistant", "content": "You are welcome."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    [s] = pu.load_samples(path, tokenizer, 256)
    assert s.chat and s.prompt == "Is snow cold?"


def test_chat_truncate_keeps_first_labelled_window(tmp_path, tokenizer):
    """A long chat with 'truncate' keeps one window, which has labels."""
    long = [{"role": "user", "content": "Tell me about the river."}, {"role": "assistant", "content": TEXT}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": long}])
    windows = pu.load_samples(path, tokenizer, 48, "window")
    [one] = pu.load_samples(path, tokenizer, 48, "truncate")
    assert len(windows) > 1 and one == windows[0] and labelled(one)
    assert all(s.chat and s.prompt == "Tell me about the river." for s in windows)


def test_chat_opening_assistant_turn(tmp_path, tokenizer):
    """A conversation that opens with an assistant turn is refused, naming the line and the fix."""
    messages = [{"role": "assistant", "content": "Hello, how can I help?"},
                {"role": "user", "content": "What is ice?"}, {"role": "assistant", "content": "Frozen water."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    with pytest.raises(pu.PelatunError, match="line 1 opens with an assistant turn.*user"):
        pu.load_samples(path, tokenizer, 256)


def test_chat_message_without_role(tmp_path, tokenizer):
    """A message without a role is refused with a PelatunError that names the line."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"content": "Hi."}, CHAT[1]]}])
    with pytest.raises(pu.PelatunError, match="line 1"):
        pu.load_samples(path, tokenizer, 256)


# ---- held-out split -------------------------------------------------------------------------------

def numbered(n):
    return [pu.Sample([i, i], [i, i]) for i in range(n)]


def indices(part):
    return [s.ids[0] for s in part]


def test_split_deterministic_disjoint_ordered():
    """The split is fixed by the seed; train and val are disjoint, cover everything, keep dataset order."""
    samples = numbered(23)
    a, b = pu.split_samples(samples, 0.2, seed=7), pu.split_samples(samples, 0.2, seed=7)
    assert indices(a["train"]) == indices(b["train"]) and indices(a["val"]) == indices(b["val"])
    train, val = indices(a["train"]), indices(a["val"])
    assert len(val) == math.ceil(23 * 0.2) == 5
    assert not set(train) & set(val) and sorted(train + val) == list(range(23))
    assert train == sorted(train) and val == sorted(val)


def test_split_seed_changes_split():
    """Different seeds give different held-out sets."""
    samples = numbered(40)
    vals = {tuple(indices(pu.split_samples(samples, 0.25, seed)["val"])) for seed in range(4)}
    assert len(vals) > 1


@pytest.mark.parametrize("n, fraction", [(10, 0.1), (10, 0.11), (7, 0.5), (3, 0.01)])
def test_split_val_size(n, fraction):
    """The val split has ceil(n * VAL_FRACTION) samples."""
    split = pu.split_samples(numbered(n), fraction, 0)
    assert len(split["val"]) == math.ceil(n * fraction) and len(split["train"]) == n - len(split["val"])


def test_split_zero_fraction():
    """VAL_FRACTION = 0 keeps every sample for training."""
    split = pu.split_samples(numbered(5), 0.0, 0)
    assert indices(split["train"]) == list(range(5)) and split["val"] == []


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_split_fraction_out_of_range(fraction):
    """VAL_FRACTION outside [0, 1) is refused."""
    with pytest.raises(pu.PelatunError, match=r"VAL_FRACTION=.* must be in \[0, 1\)"):
        pu.split_samples(numbered(10), fraction, 0)


@pytest.mark.parametrize("n, fraction", [(1, 0.5), (0, 0.0)])
def test_split_empty_train(n, fraction):
    """An empty train split is refused, naming the split."""
    with pytest.raises(pu.PelatunError, match="The train split is empty"):
        pu.split_samples(numbered(n), fraction, 0)


# ---- errors ---------------------------------------------------------------------------------------

def test_missing_file(tmp_path, tokenizer):
    """A DATA path that does not exist is named in the error."""
    with pytest.raises(pu.PelatunError, match="nowhere.txt.*does not exist"):
        pu.load_samples(tmp_path / "nowhere.txt", tokenizer, 32)


@pytest.mark.parametrize("content", ["", "  \n\n\t "])
def test_empty_txt(tmp_path, tokenizer, content):
    """An empty or blank .txt file is refused."""
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(pu.PelatunError, match="is empty"):
        pu.load_samples(path, tokenizer, 32)


@pytest.mark.parametrize("name", ["latin.txt", "latin.jsonl"])
def test_not_utf8(tmp_path, tokenizer, name):
    """Bytes that are not UTF-8 are refused, with the byte offset."""
    path = tmp_path / name
    path.write_bytes("Caf\u00e9 au lait.\n".encode("latin-1"))
    with pytest.raises(pu.PelatunError, match=r"not UTF-8 text \(byte 3\)"):
        pu.load_samples(path, tokenizer, 32)


def test_jsonl_bad_line_names_line(tmp_path, tokenizer):
    """A JSONL line that does not parse is named by its line number (blank lines counted)."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "A fine line."}\n\n{"text": "broken\n{"text": "Another fine line."}\n')
    with pytest.raises(pu.PelatunError, match="line 3 is not valid JSON"):
        pu.load_samples(path, tokenizer, 32)


@pytest.mark.parametrize("record", [{"title": "No body here."}, ["text", "a list"]])
def test_record_without_text_or_messages(tmp_path, tokenizer, record):
    """A record with neither 'text' nor 'messages' is refused, naming its line."""
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "A fine line."}, record])
    with pytest.raises(pu.PelatunError, match="line 2 has neither a 'text' nor a 'messages' field"):
        pu.load_samples(path, tokenizer, 32)


def test_chat_without_assistant(tmp_path, tokenizer):
    """A chat record without an assistant turn is refused, naming its line."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT},
                                              {"messages": [{"role": "user", "content": "Anyone there?"}]}])
    with pytest.raises(pu.PelatunError, match="line 2 has no assistant turn"):
        pu.load_samples(path, tokenizer, 256)


def test_unsupported_suffix(tmp_path, tokenizer):
    """A .csv file is refused with the supported formats."""
    path = tmp_path / "data.csv"
    path.write_text("text\nA line of text.\n")
    with pytest.raises(pu.PelatunError, match=r"data\.csv.*use a \.txt file or a \.jsonl"):
        pu.load_samples(path, tokenizer, 32)


@pytest.mark.parametrize("first, second, kind", [({"text": "Plain words."}, {"messages": CHAT}, "text"),
                                                 ({"messages": CHAT}, {"text": "Plain words."}, "messages")])
def test_mixed_formats(tmp_path, tokenizer, first, second, kind):
    """Mixing text and messages records is refused, naming the line and the first record's format."""
    path = write_jsonl(tmp_path / "m.jsonl", [first, first, second])
    with pytest.raises(pu.PelatunError, match=f"line 3 mixes formats: the first record uses {kind}"):
        pu.load_samples(path, tokenizer, 256)


def test_empty_jsonl(tmp_path, tokenizer):
    """A JSONL file with only blank lines is refused."""
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(pu.PelatunError, match="has no records"):
        pu.load_samples(path, tokenizer, 32)


@pytest.mark.parametrize("text", ["", "   ", 42])
def test_jsonl_bad_text_value(tmp_path, tokenizer, text):
    """A 'text' that is empty or not a string is refused, naming its line."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Fine."}, {"text": text}])
    with pytest.raises(pu.PelatunError, match="line 2: 'text' is empty or not a string"):
        pu.load_samples(path, tokenizer, 32)


# ---- default dataset ------------------------------------------------------------------------------

def test_default_data_records(tmp_path, tokenizer):
    """The default dataset has at least 200 user+assistant chats that all load as labelled chat samples."""
    path = pu.build_default_data(tmp_path / "sub" / "default.jsonl")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) >= 200
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in r["messages"])
    samples = pu.load_samples(path, tokenizer, 512)
    assert len(samples) == len(records) and all(s.chat and labelled(s) for s in samples)
    assert not list(path.parent.glob("*.tmp"))


def test_default_data_deterministic(tmp_path):
    """Building the default dataset twice gives identical bytes."""
    a = pu.build_default_data(tmp_path / "a.jsonl")
    b = pu.build_default_data(tmp_path / "b.jsonl")
    assert a.read_bytes() == b.read_bytes()


def test_default_data_keeps_existing(tmp_path):
    """An existing file at the path is left as it is."""
    path = tmp_path / "mine.jsonl"
    path.write_text('{"text": "My own data."}\n')
    assert pu.build_default_data(path) == path
    assert path.read_text() == '{"text": "My own data."}\n'
