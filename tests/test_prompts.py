"""The trained tokenizer and the prompt encoding (docs/method.md §1)."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fellrec_jax.data import prompts
from fellrec_jax.data.dataset import Dataset
from fellrec_jax.data.records import INPUT_END, make_record, with_history
from fellrec_jax.data.tokenizer import (SPECIAL_TOKENS, load_or_train_tokenizer, load_tokenizer, pad_id,
                                   titles_not_round_tripping, train_bpe_tokenizer, training_texts)

INSTRUCTION = "Given a list of video games the user has played before, please recommend a new game."
PHRASE = "The user has played the following video games before:"
TITLES = ['Ivan "Ironman" Stewart\'s Super Off Road', "Might &amp; Magic  Heroes", " Leading space",
          "Pok&eacute;mon Omega Ruby - Nintendo 3DS", "Call of Duty, Black Ops", "Halo 3", "Zelda",
          "Mario Kart 8 - Wii U", "Diablo III", "Tetris&reg; Ultimate"]


def _record(history=TITLES[:6], target=TITLES[6], user=1):
  return make_record(INSTRUCTION, PHRASE, history, INPUT_END, [target], user)


@pytest.fixture(scope="module")
def dataset():
  records = (_record(), _record(TITLES[3:9], TITLES[9], 2))
  return Dataset(train=records, valid=(), test=(), catalog=tuple(TITLES), histories={})


@pytest.fixture(scope="module")
def tokenizer(dataset):
  return train_bpe_tokenizer(training_texts(dataset), vocab_size=400)


def test_prompt_text_is_the_spec_template():
  record = make_record("Do X.", "Seen:", ["A"], INPUT_END, ["B"], 1)
  assert prompts.full_text(record) == (
      "Below is an instruction that describes a task, paired with an input that provides further "
      "context. Write a response that appropriately completes the request.\n\n"
      "### Instruction:\nDo X.\n\n### Input:\nSeen:\"A\"\n \n\n### Response:\n\"B\"")
  assert prompts.prompt_text(record) == prompts.full_text(record)[:-len('"B"')]


def test_trained_tokenizer_specials_and_exact_round_trip(tokenizer):
  assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
  assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
          tokenizer.pad_token_id) == (0, 1, 2, 3)
  assert len(tokenizer) <= 400
  for text in TITLES + ["unseen: ü 日本 ✓  x", prompts.full_text(_record())]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
  assert tokenizer("Zelda")["input_ids"][0] == 1  # adds BOS itself, like Llama
  assert titles_not_round_tripping(tokenizer, TITLES) == []


def test_training_is_deterministic(dataset, tokenizer):
  again = train_bpe_tokenizer(training_texts(dataset), vocab_size=400)
  assert again.get_vocab() == tokenizer.get_vocab()


def test_saved_tokenizer_reloads_from_a_local_dir(tmp_path, dataset, tokenizer):
  saved = load_or_train_tokenizer(tokenizer_path="", dataset=dataset, vocab_size=400,
                                  save_dir=tmp_path / "tok")
  loaded = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
  text = prompts.full_text(_record())
  assert loaded(text)["input_ids"] == saved(text)["input_ids"] == tokenizer(text)["input_ids"]
  assert load_tokenizer(tmp_path / "tok").pad_token_id == 3
  # A second call (a resumed run) reuses the saved one.
  assert load_or_train_tokenizer(tokenizer_path="", dataset=dataset, vocab_size=400,
                                 save_dir=tmp_path / "tok").get_vocab() == saved.get_vocab()


def test_tokenizer_without_pad_pads_with_id_zero(tmp_path, tokenizer):
  bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>",
                                 eos_token="</s>")
  bare.save_pretrained(tmp_path / "bare")
  loaded = load_tokenizer(tmp_path / "bare")
  assert loaded.pad_token_id == 0 and pad_id(loaded) == 0


def test_encode_example_whole_prompt_loss(tokenizer):
  record = _record()
  ids, mask = prompts.encode_example(tokenizer, record, cutoff_len=512, train_on_inputs=True)
  assert ids.dtype == np.int32 and mask.dtype == np.float32
  assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
  assert tokenizer.decode(ids[1:-1]) == prompts.full_text(record)
  assert mask.tolist() == [0.0] + [1.0] * (len(ids) - 1)


def test_encode_example_response_only_loss(tokenizer):
  record = _record()
  ids, mask = prompts.encode_example(tokenizer, record, cutoff_len=512, train_on_inputs=False)
  labels = ids[mask == 1]
  assert labels[-1] == tokenizer.eos_token_id
  assert tokenizer.decode(labels[:-1]) == record.output
  # Labels are one contiguous block at the end: the response and EOS.
  first = int(np.argmax(mask))
  assert mask[first:].all() and not mask[:first].any()
  prompt_ids = prompts.encode_prompt(tokenizer, record)
  assert first == len(prompt_ids)
  assert ids[:first].tolist() == prompt_ids.tolist()


def test_encode_prompt_is_the_generation_prompt(tokenizer):
  record = _record()
  ids = prompts.encode_prompt(tokenizer, record)
  assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id
  assert tokenizer.decode(ids[1:]) == prompts.prompt_text(record)
  assert tokenizer.decode(ids[1:]).endswith("### Response:\n")


def test_cutoff_drops_the_oldest_titles_and_keeps_the_response(tokenizer):
  record = _record()
  full, _ = prompts.encode_example(tokenizer, record, cutoff_len=512, train_on_inputs=True)
  last_two = with_history(record, TITLES[4:6])
  last_three = with_history(record, TITLES[3:6])
  fits_two, _ = prompts.encode_example(tokenizer, last_two, cutoff_len=512, train_on_inputs=True)
  fits_three, _ = prompts.encode_example(tokenizer, last_three, cutoff_len=512, train_on_inputs=True)
  assert len(fits_two) < len(fits_three) < len(full)
  # A cutoff one token short of three titles keeps exactly the two most recent ones.
  ids, mask = prompts.encode_example(tokenizer, record, cutoff_len=len(fits_three) - 1,
                                     train_on_inputs=False)
  assert ids.tolist() == fits_two.tolist()
  text = tokenizer.decode(ids[1:-1])
  assert TITLES[3] not in text and TITLES[4] in text and text.endswith(record.output)
  assert tokenizer.decode(ids[mask == 1][:-1]) == record.output


def reference_generate_prompt(data_point):
  """The reference's training template, transcribed from its finetune.py (input case)."""
  return f"""Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request. 

                ### Instruction:
                {data_point["instruction"]}

                ### Input:
                {data_point["input"]}

                ### Response:
                {data_point["output"]}"""


def test_reference_training_template_is_the_references(tokenizer):
  record = _record()
  text = prompts.prompt_text(record, "reference") + record.output
  assert text == reference_generate_prompt(dataclasses.asdict(record))
  ids, mask = prompts.encode_example(tokenizer, record, cutoff_len=512, train_on_inputs=True, template="reference")
  expected = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  assert ids.tolist() == expected and mask.tolist() == [0] + [1] * (len(expected) - 1)


def test_end_truncation_cuts_at_cutoff_as_the_references_tokenizer_call(tokenizer):
  record = _record()
  full, _ = prompts.encode_example(tokenizer, record, cutoff_len=10_000, train_on_inputs=True, truncation="end")
  cut = len(full) - 5  # the response's last tokens and EOS are cut off
  ids, mask = prompts.encode_example(tokenizer, record, cutoff_len=cut, train_on_inputs=True, truncation="end")
  assert ids.tolist() == full[:cut].tolist() and len(mask) == cut
  # With room for EOS it is appended (the reference appends it when shorter than the cutoff).
  ids, _ = prompts.encode_example(tokenizer, record, cutoff_len=len(full) + 3, train_on_inputs=True,
                                  truncation="end")
  assert ids.tolist() == full.tolist() and ids[-1] == tokenizer.eos_token_id
  with pytest.raises(Exception, match="truncation one of"):
    prompts.encode_example(tokenizer, record, cutoff_len=cut, train_on_inputs=True, truncation="middle")


def test_games_reference_config_sets_every_reference_behaviour_it_lists():
  from configs import games
  config, clean = games.get_config("reference"), games.get_config()
  method = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text()
  for field, value in games.REFERENCE.items():
    section, name = field.split(".")
    assert config[section][name] == value, field
    assert f"`{field}" in method, f"docs/method.md does not list {field}"
  assert [f for f in games.REFERENCE if clean[f.split(".")[0]][f.split(".")[1]] != games.REFERENCE[f]], \
      "the reference config changes nothing"
