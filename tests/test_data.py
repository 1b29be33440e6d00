"""The data layer: vocabularies, text files, TFDS builders for enwik8/text8, training batches."""

import functools
import hashlib
import http.server
import pathlib
import tempfile
import threading
import zipfile

import ml_collections
import numpy as np
import pytest

from chartx import data
from chartx.data import builders
from chartx.errors import UserError


def _data_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
      dict(name="text_files", path="", data_dir="", valid_path="", test_path="", seq_len=8))
  config.update(overrides)
  return config


# ----------------------------------------------------------------------------- vocabularies


def test_bytes_vocab_round_trips_any_text():
  text = "Größe: 3 µm — 你好\n<page>\x00"
  ids = data.BYTES.encode(text)
  assert ids.dtype == np.int32 and data.BYTES.size == 256
  assert list(ids) == list(text.encode("utf-8"))
  assert data.BYTES.decode(ids) == text


def test_bytes_vocab_decodes_broken_utf8_with_replacement():
  assert data.BYTES.decode(np.array([104, 0xFF, 105])) == "h\ufffdi"


def test_text8_vocab_is_a_to_z_then_space():
  assert data.TEXT8.size == 27
  ids = data.TEXT8.encode("abc xyz")
  assert list(ids) == [0, 1, 2, 26, 23, 24, 25]
  assert data.TEXT8.decode(ids) == "abc xyz"


def test_text8_vocab_refuses_characters_outside_its_alphabet():
  with pytest.raises(UserError, match=r"'W' at offset 6"):
    data.TEXT8.encode("hello World")


def test_decode_refuses_ids_outside_the_vocabulary():
  with pytest.raises(UserError, match="27"):
    data.TEXT8.decode([3, 27])


# ----------------------------------------------------------------------------- text_files


def _write(path: pathlib.Path, content: bytes) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)
  return path


def test_text_files_single_file_splits_90_5_5_in_order(tmp_path):
  content = bytes(range(256)) * 8  # 2048 bytes.
  corpus = data.load_corpus(_data_config(path=str(_write(tmp_path / "a.txt", content))))
  assert corpus.vocab == data.BYTES
  assert (len(corpus.train), len(corpus.validation), len(corpus.test)) == (2048 - 2 * 102, 102, 102)
  assert corpus.train.dtype == np.uint8
  joined = np.concatenate([corpus.train, corpus.validation, corpus.test]).tobytes()
  assert joined == content
  assert data.eval_stream(corpus, "test") is corpus.test
  assert data.eval_stream(corpus, "validation") is corpus.validation


def test_text_files_directory_is_recursive_sorted_and_skips_bytecode(tmp_path):
  _write(tmp_path / "b.py", b"B" * 100)
  _write(tmp_path / "a" / "z.py", b"A" * 100)
  _write(tmp_path / "__pycache__" / "b.cpython-311.pyc", b"\x00" * 500)
  _write(tmp_path / ".hidden", b"H" * 500)
  corpus = data.load_corpus(_data_config(path=str(tmp_path)))
  joined = np.concatenate([corpus.train, corpus.validation, corpus.test]).tobytes()
  assert joined == b"A" * 100 + b"B" * 100


def test_text_files_glob_and_separate_split_files(tmp_path):
  _write(tmp_path / "x1.txt", b"one " * 50)
  _write(tmp_path / "x2.txt", b"two " * 50)
  _write(tmp_path / "other.md", b"never")
  valid = _write(tmp_path / "valid.dat", b"valid text")
  test = _write(tmp_path / "test.dat", b"test text")
  corpus = data.load_corpus(_data_config(path=str(tmp_path / "x*.txt"), valid_path=str(valid),
                                         test_path=str(test)))
  assert corpus.train.tobytes() == b"one " * 50 + b"two " * 50
  assert corpus.validation.tobytes() == b"valid text"
  assert corpus.test.tobytes() == b"test text"


@pytest.mark.parametrize("make_path, message", [
    (lambda d: str(d / "missing.txt"), "no such file"),
    (lambda d: str(_write(d / "empty.txt", b"")), "is empty"),
    (lambda d: str(d / "*.nothing"), "matches no files"),
])
def test_text_files_bad_path_names_it_in_one_line(tmp_path, make_path, message):
  path = make_path(tmp_path)
  with pytest.raises(UserError, match=message) as error:
    data.load_corpus(_data_config(path=path))
  assert path in str(error.value) and "\n" not in str(error.value)


def test_text_files_missing_validation_file_names_its_key(tmp_path):
  train = _write(tmp_path / "train.txt", b"x" * 100)
  with pytest.raises(UserError, match="data.valid_path"):
    data.load_corpus(_data_config(path=str(train), valid_path=str(tmp_path / "nope.txt")))


def test_unknown_dataset_name_is_a_user_error():
  with pytest.raises(UserError, match="data.name='wiki'"):
    data.load_corpus(_data_config(name="wiki"))


# ----------------------------------------------------------------------------- TFDS builders


def _official_zip(path: pathlib.Path, member: str, content: bytes) -> pathlib.Path:
  """A zip in the official format: one deflated member named enwik8 or text8."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
    archive.writestr(member, content)
  return path


def _register(monkeypatch, name: str, zip_path: pathlib.Path, member_size: int, url: str = ""):
  """Points the builder's expectations at a small zip, as ZIPS does for the official one."""
  blob = zip_path.read_bytes()
  spec = builders.ZipSpec(url=url, zip_size=len(blob), zip_sha256=hashlib.sha256(blob).hexdigest(),
                          member=name, member_size=member_size)
  monkeypatch.setitem(builders.ZIPS, name, spec)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
  # Several chunks per split, so that reading them back in order is actually exercised.
  monkeypatch.setattr(builders, "CHUNK_CHARS", 64)


def _enwik8_like(num: int) -> bytes:
  return np.random.default_rng(0).integers(0, 256, num, dtype=np.uint8).tobytes()


def _text8_like(num: int) -> bytes:
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
  return np.random.default_rng(1).choice(letters, num).tobytes()


def _nothing_prepared(data_dir: pathlib.Path, name: str) -> bool:
  """No version directory and no TFDS temp directory: nothing a later run could mistake for data."""
  dataset_dir = data_dir / name
  return not dataset_dir.exists() or not any(dataset_dir.iterdir())


def test_enwik8_builds_from_manual_dir_with_standard_splits(tmp_path, monkeypatch):
  content = _enwik8_like(2000)
  zip_path = _official_zip(tmp_path / "tfds" / "downloads" / "manual" / "enwik8.zip", "enwik8", content)
  _register(monkeypatch, "enwik8", zip_path, len(content))
  corpus = data.load_corpus(_data_config(name="enwik8", data_dir=str(tmp_path / "tfds")))
  assert corpus.vocab == data.BYTES
  assert (len(corpus.train), len(corpus.validation), len(corpus.test)) == (1800, 100, 100)
  assert corpus.train.tobytes() == content[:1800]
  assert corpus.validation.tobytes() == content[1800:1900]
  assert corpus.test.tobytes() == content[1900:]
  assert corpus.vocab.decode(corpus.vocab.encode("x<y>&z")) == "x<y>&z"
  assert (tmp_path / "tfds" / "enwik8" / "1.0.0" / "dataset_info.json").exists()
  assert list((tmp_path / "tfds" / "enwik8" / "1.0.0").glob("*.array_record*"))


def test_text8_builds_from_data_path_and_reloads_without_the_zip(tmp_path, monkeypatch):
  content = _text8_like(4000)
  zip_path = _official_zip(tmp_path / "elsewhere" / "t8.zip", "text8", content)
  _register(monkeypatch, "text8", zip_path, len(content))
  config = _data_config(name="text8", data_dir=str(tmp_path / "tfds"), path=str(zip_path))
  corpus = data.load_corpus(config)
  assert corpus.vocab == data.TEXT8
  assert (len(corpus.train), len(corpus.validation), len(corpus.test)) == (3600, 200, 200)
  assert int(corpus.train.max()) <= 26
  joined = np.concatenate([corpus.train, corpus.validation, corpus.test])
  assert corpus.vocab.decode(joined) == content.decode("ascii")
  np.testing.assert_array_equal(corpus.vocab.encode(content[:50].decode()), corpus.train[:50])

  zip_path.unlink()  # The prepared dataset is read from TFDS's files, not from the zip.
  config.path = ""
  again = data.load_corpus(config)
  np.testing.assert_array_equal(again.train, corpus.train)
  np.testing.assert_array_equal(again.test, corpus.test)


def test_preparing_leaves_no_temporary_directory(tmp_path, monkeypatch):
  scratch = tmp_path / "tmp"  # tempfile's default directory while the dataset is prepared.
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  content = _enwik8_like(2000)
  zip_path = _official_zip(tmp_path / "tfds" / "downloads" / "manual" / "enwik8.zip", "enwik8", content)
  _register(monkeypatch, "enwik8", zip_path, len(content))
  corpus = data.load_corpus(_data_config(name="enwik8", data_dir=str(tmp_path / "tfds")))
  assert corpus.train.tobytes() == content[:1800]
  assert list(scratch.iterdir()) == []
  assert tempfile.tempdir == str(scratch)  # Restored.


def test_zip_with_wrong_checksum_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
  content = _enwik8_like(2000)
  manual = tmp_path / "tfds" / "downloads" / "manual" / "enwik8.zip"
  good = _official_zip(manual, "enwik8", content).read_bytes()
  _register(monkeypatch, "enwik8", manual, len(content))
  corrupt = bytearray(good)
  corrupt[len(corrupt) // 2] ^= 0xFF  # Same size, one flipped byte.
  manual.write_bytes(bytes(corrupt))
  config = _data_config(name="enwik8", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(UserError, match="SHA-256") as error:
    data.load_corpus(config)
  assert str(manual) in str(error.value) and "\n" not in str(error.value)
  assert _nothing_prepared(tmp_path / "tfds", "enwik8")

  manual.write_bytes(good)  # The next run with the right file builds normally.
  assert data.load_corpus(config).test.tobytes() == content[1900:]


def test_build_interrupted_while_writing_leaves_nothing_and_the_next_run_builds(tmp_path, monkeypatch):
  content = _enwik8_like(2000)
  manual = _official_zip(tmp_path / "tfds" / "downloads" / "manual" / "enwik8.zip", "enwik8", content)
  _register(monkeypatch, "enwik8", manual, len(content))
  write_chunks = builders.Enwik8._generate_examples

  def dies_after_two_chunks(self, ids_M):
    for i, example in enumerate(write_chunks(self, ids_M)):
      if i == 2:
        raise KeyboardInterrupt
      yield example

  config = _data_config(name="enwik8", data_dir=str(tmp_path / "tfds"))
  with monkeypatch.context() as patch:
    patch.setattr(builders.Enwik8, "_generate_examples", dies_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
      data.load_corpus(config)
  assert _nothing_prepared(tmp_path / "tfds", "enwik8")
  corpus = data.load_corpus(config)
  assert np.concatenate([corpus.train, corpus.validation, corpus.test]).tobytes() == content


def test_corrupt_zip_contents_are_refused_even_when_the_checksum_is_expected(tmp_path, monkeypatch):
  manual = tmp_path / "tfds" / "downloads" / "manual" / "enwik8.zip"
  _official_zip(manual, "enwik8", _enwik8_like(2000))
  blob = bytearray(manual.read_bytes())
  blob[40] ^= 0xFF  # Inside the deflated member: the zip's CRC check fails.
  manual.write_bytes(bytes(blob))
  _register(monkeypatch, "enwik8", manual, 2000)
  with pytest.raises(UserError, match="not a readable zip"):
    data.load_corpus(_data_config(name="enwik8", data_dir=str(tmp_path / "tfds")))
  assert _nothing_prepared(tmp_path / "tfds", "enwik8")


def test_empty_zip_file_is_refused(tmp_path, monkeypatch):
  manual = tmp_path / "tfds" / "downloads" / "manual" / "enwik8.zip"
  _register(monkeypatch, "enwik8", _official_zip(tmp_path / "real.zip", "enwik8", b"x" * 100), 100)
  manual.parent.mkdir(parents=True)
  manual.write_bytes(b"")
  with pytest.raises(UserError, match="is 0 bytes"):
    data.load_corpus(_data_config(name="enwik8", data_dir=str(tmp_path / "tfds")))
  assert _nothing_prepared(tmp_path / "tfds", "enwik8")


def test_text8_with_characters_outside_its_alphabet_is_refused(tmp_path, monkeypatch):
  content = _text8_like(1000)[:700] + b"Q" + _text8_like(299)
  manual = _official_zip(tmp_path / "tfds" / "downloads" / "manual" / "text8.zip", "text8", content)
  _register(monkeypatch, "text8", manual, len(content))
  with pytest.raises(UserError, match=r"'Q' at offset 700") as error:
    data.load_corpus(_data_config(name="text8", data_dir=str(tmp_path / "tfds")))
  assert "\n" not in str(error.value)
  assert _nothing_prepared(tmp_path / "tfds", "text8")


def test_zip_with_the_wrong_member_is_refused(tmp_path, monkeypatch):
  manual = _official_zip(tmp_path / "tfds" / "downloads" / "manual" / "text8.zip", "enwik8",
                         _text8_like(1000))
  _register(monkeypatch, "text8", manual, 1000)
  with pytest.raises(UserError, match="not the single file 'text8'"):
    data.load_corpus(_data_config(name="text8", data_dir=str(tmp_path / "tfds")))


def test_missing_zip_says_what_to_get_and_where_to_put_it(tmp_path, monkeypatch):
  # Port 9 on localhost refuses at once: the download fails as it does on a machine without network.
  url = "http://127.0.0.1:9/enwik8.zip"
  _register(monkeypatch, "enwik8", _official_zip(tmp_path / "real.zip", "enwik8", b"x" * 100), 100,
            url=url)
  data_dir = tmp_path / "tfds"
  with pytest.raises(UserError) as error:
    data.load_corpus(_data_config(name="enwik8", data_dir=str(data_dir)))
  message = str(error.value)
  assert url in message and str(data_dir / "downloads" / "manual" / "enwik8.zip") in message
  assert "\n" not in message
  assert _nothing_prepared(data_dir, "enwik8")
  assert not list((data_dir / "downloads").glob("enwik8.zip*"))  # No partial download left.


@pytest.fixture
def http_dir(tmp_path):
  """A local HTTP server over a directory: the official URL, without the network."""
  served = tmp_path / "served"
  served.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.01), daemon=True)
  thread.start()
  yield served, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def test_downloads_the_zip_when_the_network_allows(tmp_path, monkeypatch, http_dir):
  served, base_url = http_dir
  content = _enwik8_like(2000)
  zip_path = _official_zip(served / "enwik8.zip", "enwik8", content)
  _register(monkeypatch, "enwik8", zip_path, len(content), url=f"{base_url}/enwik8.zip")
  data_dir = tmp_path / "tfds"
  corpus = data.load_corpus(_data_config(name="enwik8", data_dir=str(data_dir)))
  assert corpus.validation.tobytes() == content[1800:1900]
  assert (data_dir / "downloads" / "enwik8.zip").read_bytes() == zip_path.read_bytes()


def test_a_wrong_download_is_refused_and_not_kept(tmp_path, monkeypatch, http_dir):
  served, base_url = http_dir
  _register(monkeypatch, "enwik8", _official_zip(tmp_path / "real.zip", "enwik8", _enwik8_like(2000)),
            2000, url=f"{base_url}/enwik8.zip")
  _official_zip(served / "enwik8.zip", "enwik8", _enwik8_like(1999) + b"!")  # Not the pinned file.
  data_dir = tmp_path / "tfds"
  with pytest.raises(UserError, match="SHA-256"):
    data.load_corpus(_data_config(name="enwik8", data_dir=str(data_dir)))
  assert not list((data_dir / "downloads").glob("enwik8.zip*"))
  assert _nothing_prepared(data_dir, "enwik8")


def test_missing_zip_at_data_path_names_the_key(tmp_path, monkeypatch):
  _register(monkeypatch, "enwik8", _official_zip(tmp_path / "real.zip", "enwik8", b"x" * 100), 100)
  with pytest.raises(UserError, match="data.path="):
    data.load_corpus(_data_config(name="enwik8", data_dir=str(tmp_path / "tfds"),
                                  path=str(tmp_path / "nope.zip")))


def test_official_zip_registry_pins_the_100mb_files():
  for name in ("enwik8", "text8"):
    spec = builders.ZIPS[name]
    assert spec.url == f"http://mattmahoney.net/dc/{name}.zip" and spec.member == name
    assert spec.member_size == 100_000_000 and len(spec.zip_sha256) == 64
    assert builders.split_sizes(spec.member_size) == {
        "train": 90_000_000, "validation": 5_000_000, "test": 5_000_000}


# ----------------------------------------------------------------------------- training batches


def test_batch_rows_are_windows_of_the_stream():
  ids_M = np.arange(1000)  # Each id is its own position, so a row shows where its window starts.
  batch = data.train_batch(ids_M, seed=3, step=7, batch_size=16, length=33)
  assert batch.shape == (16, 33) and batch.dtype == np.int32
  for row in batch:
    assert 0 <= row[0] <= 1000 - 33
    np.testing.assert_array_equal(row, np.arange(row[0], row[0] + 33))


def test_batches_are_a_pure_function_of_seed_and_step_across_restarts():
  ids_M = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)
  kwargs = dict(seed=11, batch_size=8, length=17)
  uninterrupted = [data.train_batch(ids_M, step=s, **kwargs) for s in range(20)]
  for restart_at in (0, 1, 7, 19):
    before = [data.train_batch(ids_M, step=s, **kwargs) for s in range(restart_at)]
    data.train_batch(ids_M, seed=99, step=0, batch_size=4, length=5)  # Unrelated calls in between.
    after = [data.train_batch(ids_M, step=s, **kwargs) for s in range(restart_at, 20)]
    for s, batch in enumerate(before + after):
      np.testing.assert_array_equal(batch, uninterrupted[s])
  assert not np.array_equal(uninterrupted[0], uninterrupted[1])
  assert not np.array_equal(uninterrupted[0], data.train_batch(ids_M, seed=12, step=0, batch_size=8,
                                                               length=17))


@pytest.mark.parametrize("process_count", [1, 2, 4, 8])
def test_process_slices_concatenate_to_the_global_batch(process_count):
  ids_M = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)
  for step in (0, 5, 123):
    global_batch = data.train_batch(ids_M, seed=0, step=step, batch_size=8, length=9)
    slices = [data.train_batch(ids_M, seed=0, step=step, batch_size=8, length=9,
                               process_index=p, process_count=process_count)
              for p in range(process_count)]
    assert all(s.shape == (8 // process_count, 9) for s in slices)
    np.testing.assert_array_equal(np.concatenate(slices), global_batch)


def test_every_start_position_is_reachable():
  ids_M = np.arange(10, dtype=np.uint8)  # Windows of 4: starts 0..6.
  starts = {int(row[0]) for s in range(200)
            for row in data.train_batch(ids_M, seed=0, step=s, batch_size=4, length=4)}
  assert starts == set(range(7))
  whole = data.train_batch(ids_M, seed=0, step=0, batch_size=2, length=10)
  np.testing.assert_array_equal(whole, np.stack([np.arange(10)] * 2))


def test_batch_errors_name_the_problem():
  ids_M = np.zeros(100, dtype=np.uint8)
  with pytest.raises(UserError, match="batch_size=6"):
    data.train_batch(ids_M, seed=0, step=0, batch_size=6, length=8, process_count=4)
  with pytest.raises(UserError, match="101 characters"):
    data.train_batch(ids_M, seed=0, step=0, batch_size=4, length=101)


# ------------------------------------------------------------------ sequential (stream) batches


def test_stream_batches_continue_each_stream_and_start_over_with_a_reset():
  """Row b of every step is stream b: each step's inputs follow the previous step's, the K
  targets after them overlap the next step's window, and after its last whole segment a stream
  starts over at its beginning, flagged for a memory reset."""
  ids_M = np.arange(1003)  # Each id is its own position. 4 streams of 250 (3 left out).
  seq_len, num_targets = 32, 2
  segments = data.segments_per_pass(len(ids_M), batch_size=4, seq_len=seq_len, num_targets=num_targets)
  assert segments == (250 - 2) // 32 == 7
  seen = []
  for step in range(2 * segments + 1):
    windows_BxS, reset_B = data.stream_batch(ids_M, step=step, batch_size=4, seq_len=seq_len,
                                             num_targets=num_targets)
    assert windows_BxS.shape == (4, seq_len + num_targets) and windows_BxS.dtype == np.int32
    segment = step % segments
    for b, row in enumerate(windows_BxS):
      np.testing.assert_array_equal(row, b * 250 + segment * seq_len + np.arange(seq_len + num_targets))
      assert row[-1] < (b + 1) * 250  # A window never reads into the next stream.
    assert reset_B.tolist() == [segment == 0] * 4
    seen.append(windows_BxS[:, :seq_len])
  # One pass reads every stream's inputs once, in order, up to its last whole segment.
  one_pass = np.concatenate(seen[:segments], axis=1)
  np.testing.assert_array_equal(one_pass, np.arange(4)[:, None] * 250 + np.arange(segments * seq_len))


def test_stream_batches_are_a_pure_function_of_the_step_and_slice_by_process():
  ids_M = np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8)
  kwargs = dict(batch_size=8, seq_len=16, num_targets=1)
  for step in (0, 3, 38, 39, 1000):
    windows_BxS, reset_B = data.stream_batch(ids_M, step=step, **kwargs)
    again_BxS, again_B = data.stream_batch(ids_M, step=step, **kwargs)  # No hidden state.
    np.testing.assert_array_equal(windows_BxS, again_BxS)
    np.testing.assert_array_equal(reset_B, again_B)
    slices = [data.stream_batch(ids_M, step=step, process_index=p, process_count=4, **kwargs)
              for p in range(4)]
    np.testing.assert_array_equal(np.concatenate([w for w, _ in slices]), windows_BxS)
    np.testing.assert_array_equal(np.concatenate([r for _, r in slices]), reset_B)


def test_stream_batch_errors_name_the_problem():
  ids_M = np.zeros(100, dtype=np.uint8)
  with pytest.raises(UserError, match="batch_size=6"):
    data.stream_batch(ids_M, step=0, batch_size=6, seq_len=8, num_targets=1, process_count=4)
  with pytest.raises(UserError, match=r"train.batch_size=10 streams of 10, has no room for a segment "
                                      r"of data.seq_len=10 characters and 1 target"):
    data.stream_batch(ids_M, step=0, batch_size=10, seq_len=10, num_targets=1)


def test_loading_benchmark_runs_end_to_end_on_a_small_file(tmp_path, monkeypatch):
  from chartx.tools import data_bench as bench
  monkeypatch.setitem(builders.ZIPS, "enwik8", builders.ZIPS["enwik8"])  # run() repoints it.
  results = bench.run(str(tmp_path), 20_000)
  assert results["train_chars"] == 18_000
  assert all(results[k] >= 0 for k in ("write_zip_s", "verify_and_build_s", "load_train_s"))
