"""The dataset downloader, offline: tiny archives with the real internal layout, served from 127.0.0.1."""
import gzip
import hashlib
import io
import os
import random
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from datasets import download
from datasets.download import ADE, VOC_AUG, VOC_TRAINVAL, DownloadError, Retry, prepare_ade, prepare_voc, voc_split_ids
from datasets.layout import DatasetLayoutError, split_files, voc_base

REPO = Path(__file__).resolve().parents[1]
NO_WAIT = Retry(attempts=1, first_wait_s=0, timeout_s=10)

# VOC ids by role: official segmentation train / val, SBD-only (label only in SegmentationClassAug),
# and a JPEG with no segmentation label at all.
SEG_TRAIN = ["2007_000032", "2007_000039"]
SEG_VAL = ["2007_000033", "2007_000042"]
SBD_ONLY = ["2008_000002", "2008_000003", "2008_000008"]
NO_LABEL = ["2008_000100"]
TRAIN_AUG = sorted(SEG_TRAIN + SBD_ONLY)
ADE_TRAIN = [f"ADE_train_{i:08d}" for i in (1, 2, 3)]
ADE_VAL = [f"ADE_val_{i:08d}" for i in (1, 2)]


def payload(seed: str, size: int = 3000) -> bytes:
    return random.Random(seed).randbytes(size)  # incompressible, so the archives are tens of kB


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def voc_trainval_tar(extra: dict[str, bytes] | None = None) -> bytes:
    base = "VOCdevkit/VOC2012"
    files = {f"{base}/JPEGImages/{i}.jpg": payload(i) for i in SEG_TRAIN + SEG_VAL + SBD_ONLY + NO_LABEL}
    files.update({f"{base}/SegmentationClass/{i}.png": payload("seg" + i, 200) for i in SEG_TRAIN + SEG_VAL})
    files.update({f"{base}/Annotations/{i}.xml": b"<annotation/>" for i in SEG_TRAIN + SEG_VAL + SBD_ONLY + NO_LABEL})
    for name, ids in (("train", SEG_TRAIN), ("val", SEG_VAL), ("trainval", SEG_TRAIN + SEG_VAL)):
        files[f"{base}/ImageSets/Segmentation/{name}.txt"] = "".join(f"{i}\n" for i in ids).encode()
    files.update(extra or {})
    return tar_bytes(files)


def aug_zip() -> bytes:
    files = {}
    for i in SEG_TRAIN + SEG_VAL + SBD_ONLY:
        files[f"SegmentationClassAug/{i}.png"] = payload("aug" + i, 300)
        files[f"__MACOSX/SegmentationClassAug/._{i}.png"] = b"resource fork"
    return zip_bytes(files)


def ade_zip(extra: dict[str, bytes] | None = None, class_names: bool = True,
            compression: int = zipfile.ZIP_STORED) -> bytes:
    base = "ADEChallengeData2016"
    files = {f"{base}/sceneCategories.txt": b""}
    if class_names:
        files[f"{base}/objectInfo150.txt"] = b"Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n"
    for folder, ids in (("training", ADE_TRAIN), ("validation", ADE_VAL)):
        for i in ids:
            files[f"{base}/images/{folder}/{i}.jpg"] = payload(i)
            files[f"{base}/annotations/{folder}/{i}.png"] = payload("a" + i, 300)
    files.update(extra or {})
    return zip_bytes(files, compression)


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


class ArchiveServer:
    """Serves ``files`` on 127.0.0.1 with Range support; ``cut[name] = n`` sends only half of the next n answers."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut: dict[str, int] = {}
        self.honour_range = True
        self.requests: list[tuple[str, int, int]] = []  # (name, first byte asked, bytes sent)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                if name.startswith("moved/"):  # as Dropbox's ?dl=1 links do
                    self.send_response(302)
                    self.send_header("Location", server.url(name.removeprefix("moved/")))
                    self.end_headers()
                    return
                if name not in server.files:
                    server.requests.append((name, 0, 0))
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                asked = self.headers.get("Range")
                if asked and server.honour_range:
                    start = int(asked.removeprefix("bytes=").rstrip("-"))
                if start >= len(data) and start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    server.requests.append((name, start, 0))
                    return
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut.get(name, 0):
                    server.cut[name] -= 1
                    body = body[: len(body) // 2]  # then the connection closes (HTTP/1.0)
                self.wfile.write(body)
                server.requests.append((name, start, len(body)))

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"

    def sent(self, name: str) -> int:
        return sum(sent for n, _, sent in self.requests if n == name)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture
def served(no_proxy):
    files = {"VOCtrainval.tar": voc_trainval_tar(), "SegmentationClassAug.zip": aug_zip(), "ADE.zip": ade_zip()}
    server = ArchiveServer(files)
    yield server
    server.close()


def voc_archives(server, trainval_checksum=None):
    tar = server.files["VOCtrainval.tar"]
    trainval = replace(VOC_TRAINVAL, url=server.url("VOCtrainval.tar"), checksum=trainval_checksum or md5(tar))
    aug = replace(VOC_AUG, url=server.url("SegmentationClassAug.zip"))
    return trainval, aug


def run_voc(root, server, retry=NO_WAIT, counts=(len(TRAIN_AUG), len(SEG_VAL)), **kwargs):
    trainval, aug = voc_archives(server, kwargs.pop("trainval_checksum", None))
    return prepare_voc(root, trainval, aug, counts=counts, retry=retry, **kwargs)


def nothing_half_done(root: Path) -> bool:
    """No final dataset folder and no staging folder (a leftover .part for resuming is fine)."""
    return not (root / "VOCdevkit" / "VOC2012").exists() and not list(root.glob(".*.partial"))


# --- the split-list rule -------------------------------------------------------------------------


def test_train_aug_rule_on_fake_ids():
    aug = {"a", "b", "v", "nojpeg"}
    jpegs = {"a", "b", "v", "x"}
    train, val = voc_split_ids(aug, jpegs, ["v", "w"])
    assert train == ["a", "b"]  # no val id, no id without a JPEG, no id without a label
    assert val == ["v", "w"]


def test_train_aug_rule_gives_the_standard_10582(shared_data):
    """SegmentationClassAug holds 12031 labels: the standard train-aug and val ids, which are disjoint."""
    train_aug = [line.split()[0] for line in (shared_data / "voc" / "train_cls.txt").read_text().splitlines()]
    val = [line.split()[0] for line in (shared_data / "voc" / "val_cls.txt").read_text().splitlines()]
    aug_labels = set(train_aug) | set(val)
    assert len(aug_labels) == 12031
    jpegs = aug_labels | {f"2012_9{i:05d}" for i in range(5000)}  # VOC has JPEGs without any segmentation
    got_train, got_val = voc_split_ids(aug_labels, jpegs, val)
    assert len(got_train) == 10582 and got_train == sorted(train_aug)
    assert len(got_val) == 1449


# --- VOC -----------------------------------------------------------------------------------------


def test_voc_layout_is_what_the_project_reads(tmp_path, served):
    final = run_voc(tmp_path, served)
    assert final == tmp_path / "VOCdevkit" / "VOC2012" and voc_base(tmp_path) == final
    train, val = split_files("voc", tmp_path, "train"), split_files("voc", tmp_path, "val")
    assert list(train.ids) == TRAIN_AUG
    assert list(val.ids) == SEG_VAL
    assert all(p.is_file() for p in train.images + train.labels + val.images + val.labels)
    assert (final / "SegmentationClassAug" / f"{SBD_ONLY[0]}.png").read_bytes() == payload("aug" + SBD_ONLY[0], 300)
    assert sorted(p.name for p in (final / "SegmentationClassAug").iterdir()) == sorted(
        f"{i}.png" for i in SEG_TRAIN + SEG_VAL + SBD_ONLY)  # no macOS resource forks
    assert (final / "ImageSets" / "Segmentation" / "val.txt").is_file()
    assert (final / download.MARKER).is_file()
    assert not list(tmp_path.glob(".*.partial")) and not (tmp_path / "downloads").exists()


def test_second_run_downloads_nothing(tmp_path, served):
    run_voc(tmp_path, served)
    asked = len(served.requests)
    run_voc(tmp_path, served)
    assert len(served.requests) == asked


def test_resume_after_a_cut_connection(tmp_path, served):
    total = len(served.files["VOCtrainval.tar"])
    served.cut["VOCtrainval.tar"] = 1
    with pytest.raises(DownloadError, match=r"closed after \d+ of \d+ bytes.*Rerun `bash download_voc.sh"):
        run_voc(tmp_path, served)
    partial = tmp_path / "downloads" / "VOCtrainval_11-May-2012.tar.part"
    assert 0 < partial.stat().st_size < total
    assert nothing_half_done(tmp_path)
    first = served.sent("VOCtrainval.tar")
    run_voc(tmp_path, served)
    second = served.sent("VOCtrainval.tar") - first
    assert first + second == total and second < total
    assert [start for name, start, _ in served.requests if name == "VOCtrainval.tar"] == [0, first]
    assert len(split_files("voc", tmp_path, "train")) == len(TRAIN_AUG)


def test_retries_resume_within_one_run(tmp_path, served):
    served.cut["SegmentationClassAug.zip"] = 2
    run_voc(tmp_path, served, retry=Retry(attempts=3, first_wait_s=0, timeout_s=10))
    starts = [start for name, start, _ in served.requests if name == "SegmentationClassAug.zip"]
    assert len(starts) == 3 and 0 == starts[0] < starts[1] < starts[2]
    assert served.sent("SegmentationClassAug.zip") == len(served.files["SegmentationClassAug.zip"])


def test_resume_follows_a_redirect_with_the_range(tmp_path, served):
    served.cut["SegmentationClassAug.zip"] = 1
    trainval, aug = voc_archives(served)
    moved = replace(aug, url=served.url("moved/SegmentationClassAug.zip"))
    prepare_voc(tmp_path, trainval, moved, counts=(5, 2), retry=Retry(attempts=2, first_wait_s=0, timeout_s=10))
    starts = [start for name, start, _ in served.requests if name == "SegmentationClassAug.zip"]
    assert len(starts) == 2 and starts[1] > 0


def test_a_whole_part_file_left_before_the_rename_is_not_fetched_again(tmp_path, served):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "VOCtrainval_11-May-2012.tar.part").write_bytes(served.files["VOCtrainval.tar"])
    run_voc(tmp_path, served)
    assert served.sent("VOCtrainval.tar") == 0  # the Range request past the end got a 416
    assert len(split_files("voc", tmp_path, "train")) == len(TRAIN_AUG)


def test_a_server_ignoring_range_makes_it_start_over(tmp_path, served):
    served.honour_range = False
    served.cut["VOCtrainval.tar"] = 1
    run_voc(tmp_path, served, retry=Retry(attempts=2, first_wait_s=0, timeout_s=10))  # the MD5 would catch an append
    assert len(split_files("voc", tmp_path, "val")) == len(SEG_VAL)


def test_checksum_mismatch_is_named_and_leaves_nothing(tmp_path, served):
    wrong = "md5:" + "0" * 32
    got = hashlib.md5(served.files["VOCtrainval.tar"]).hexdigest()
    with pytest.raises(DownloadError, match=f"md5 checksum {got} does not match the expected {'0' * 32}.*removed"):
        run_voc(tmp_path, served, trainval_checksum=wrong)
    assert nothing_half_done(tmp_path)
    assert not list((tmp_path / "downloads").iterdir())  # neither the bad file nor a .part to resume from


def test_failed_content_check_leaves_nothing_half_done_and_keeps_archives(tmp_path, served):
    with pytest.raises(DownloadError, match=r"train has 5 images, expected 10582.*Nothing was put in"):
        run_voc(tmp_path, served, counts=(10582, 1449))
    assert nothing_half_done(tmp_path)
    asked = len(served.requests)
    run_voc(tmp_path, served)  # a finished archive is not fetched again
    assert len(served.requests) == asked
    assert (tmp_path / "VOCdevkit" / "VOC2012" / download.MARKER).is_file()


def test_missing_labels_for_val_fail_the_check(tmp_path, served):
    served.files["SegmentationClassAug.zip"] = zip_bytes(
        {f"SegmentationClassAug/{i}.png": b"x" for i in SEG_TRAIN + SBD_ONLY})
    with pytest.raises(DownloadError, match="val: 2 listed files are missing"):
        run_voc(tmp_path, served)
    assert nothing_half_done(tmp_path)


def test_an_official_train_id_without_an_aug_label_fails_the_check(tmp_path, served):
    served.files["SegmentationClassAug.zip"] = zip_bytes(
        {f"SegmentationClassAug/{i}.png": b"x" for i in SEG_TRAIN[1:] + SEG_VAL + SBD_ONLY})
    with pytest.raises(DownloadError, match=f"1 official train ids have no SegmentationClassAug label, e.g. {SEG_TRAIN[0]}"):
        run_voc(tmp_path, served, counts=(len(TRAIN_AUG) - 1, len(SEG_VAL)))
    assert nothing_half_done(tmp_path)


def test_leftovers_of_a_killed_run_are_not_a_dataset_and_are_cleared(tmp_path, served):
    stale = tmp_path / ".VOC2012.partial" / "VOCdevkit" / "VOC2012"
    (stale / "JPEGImages").mkdir(parents=True)
    (stale / "SegmentationClassAug").mkdir()
    (stale / "JPEGImages" / "half.jpg").write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match="wrong layout"):
        voc_base(tmp_path)
    run_voc(tmp_path, served)
    assert not (tmp_path / ".VOC2012.partial").exists()
    assert not (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "half.jpg").exists()


def test_an_incomplete_existing_folder_is_refused_untouched(tmp_path, served):
    old = tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages"
    old.mkdir(parents=True)
    (old / "mine.jpg").write_bytes(b"keep")
    with pytest.raises(DownloadError, match=r"exists but is incomplete.*mv "):
        run_voc(tmp_path, served)
    assert (old / "mine.jpg").read_bytes() == b"keep"
    assert served.requests == []


def test_a_missing_file_fails_at_once_naming_the_url(tmp_path, served):
    trainval, aug = voc_archives(served)
    gone = replace(trainval, url=served.url("nothing-here.tar"))
    with pytest.raises(DownloadError, match=r"nothing-here.tar \(HTTP 404.*MBS_VOC_TRAINVAL_URL"):
        prepare_voc(tmp_path, gone, aug, counts=(5, 2), retry=Retry(attempts=3, first_wait_s=0))
    assert served.requests == [("nothing-here.tar", 0, 0)]  # a 404 is not retried
    assert nothing_half_done(tmp_path)


# --- ADE20K --------------------------------------------------------------------------------------


def ade_archive(server, name="ADE.zip"):
    return replace(ADE, url=server.url(name), checksum="sha1:" + hashlib.sha1(server.files[name]).hexdigest())


def test_ade_layout_is_what_the_project_reads(tmp_path, served):
    final = prepare_ade(tmp_path, ade_archive(served), counts=(3, 2), retry=NO_WAIT, keep_archives=True)
    assert final == tmp_path / "ADEChallengeData2016"
    train, val = split_files("ade", tmp_path, "train"), split_files("ade", tmp_path, "val")
    assert list(train.ids) == ADE_TRAIN and list(val.ids) == ADE_VAL
    assert all(p.is_file() for p in train.labels + val.labels)
    assert (final / "objectInfo150.txt").is_file() and (final / download.MARKER).is_file()
    assert (tmp_path / "downloads" / "ADEChallengeData2016.zip").is_file()


def test_ade_from_a_local_file_url(tmp_path, served):
    local = tmp_path / "mirror" / "ADEChallengeData2016.zip"
    local.parent.mkdir()
    local.write_bytes(served.files["ADE.zip"])
    archive = replace(ade_archive(served), url=local.as_uri())
    prepare_ade(tmp_path / "root", archive, counts=(3, 2), retry=NO_WAIT)
    assert len(split_files("ade", tmp_path / "root", "val")) == 2
    assert served.requests == []


def test_ade_unsafe_member_is_refused(tmp_path, served):
    served.files["evil.zip"] = ade_zip({"../escaped.txt": b"x"})
    with pytest.raises(DownloadError, match="unsafe path '../escaped.txt'"):
        prepare_ade(tmp_path / "root", ade_archive(served, "evil.zip"), counts=(3, 2), retry=NO_WAIT)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "root" / "ADEChallengeData2016").exists()
    assert not list((tmp_path / "root").glob(".*.partial"))


def test_ade_without_class_names_fails_the_check(tmp_path, served):
    served.files["ADE.zip"] = ade_zip(class_names=False)
    with pytest.raises(DownloadError, match="objectInfo150.txt .the class names. is missing"):
        prepare_ade(tmp_path, ade_archive(served), counts=(3, 2), retry=NO_WAIT)
    assert not (tmp_path / "ADEChallengeData2016").exists() and not list(tmp_path.glob(".*.partial"))


# --- the commands the README gives ---------------------------------------------------------------


def run_command(args, env):
    full_env = {**os.environ, **env, "PYTHON": sys.executable}
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_download_voc_sh_uses_the_url_variables(tmp_path, served):
    env = {"MBS_VOC_TRAINVAL_URL": served.url("VOCtrainval.tar"),
           "MBS_VOC_AUG_URL": served.url("SegmentationClassAug.zip")}
    checksum = md5(served.files["VOCtrainval.tar"])
    done = run_command(["bash", "download_voc.sh", str(tmp_path), "--trainval-checksum", checksum,
                        "--expect-train", "5", "--expect-val", "2"], env)
    assert done.returncode == 0, done.stderr
    assert list(split_files("voc", tmp_path, "train").ids) == TRAIN_AUG


@pytest.mark.slow
def test_download_ade20k_py_fails_with_one_line_and_exit_code(tmp_path, served):
    env = {"MBS_ADE_URL": served.url("ADE.zip"), "MBS_ADE_CHECKSUM": "sha1:" + "0" * 40}
    done = run_command([sys.executable, "download_ade20k.py", str(tmp_path)], env)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "sha1 checksum" in last and f"python download_ade20k.py {tmp_path}" in last
    env["MBS_ADE_CHECKSUM"] = "none"
    done = run_command([sys.executable, "download_ade20k.py", str(tmp_path), "--expect-train", "3",
                        "--expect-val", "2"], env)
    assert done.returncode == 0, done.stderr
    assert len(split_files("ade", tmp_path, "train")) == 3


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The downloader's failure: exit code 2 and one line on stderr, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def put_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- local files, damaged archives, paths of the wrong kind -----------------------------------


def test_a_missing_local_file_fails_at_once_with_one_line(tmp_path, served):
    missing = tmp_path / "mirror" / "VOCtrainval_11-May-2012.tar"
    env = {"MBS_VOC_TRAINVAL_URL": missing.as_uri(), "MBS_VOC_AUG_URL": served.url("SegmentationClassAug.zip")}
    started = time.monotonic()
    done = run_command(["sh", "download_voc.sh", str(tmp_path / "data")], env)  # the default 5 attempts
    assert time.monotonic() - started < 5  # retries (2 + 4 + 8 + 16 s) are for network errors
    line = one_error_line(done)
    assert f"{missing} (No such file or directory)" in line and "MBS_VOC_TRAINVAL_URL" in line
    assert "resum" not in line.lower()  # nothing to resume from a file that is not there


def damaged_member(zip_data: bytes, member: bytes) -> bytes:
    """``zip_data`` with one byte of a stored member flipped: the zip opens, the member fails its CRC when read."""
    at = zip_data.index(member) + len(member) // 2
    return zip_data[:at] + bytes([zip_data[at] ^ 0xFF]) + zip_data[at + 1:]


def test_a_corrupt_zip_member_fails_with_one_line_and_the_archive_is_removed(tmp_path):
    source = put_file(tmp_path / "mirror" / "ADEChallengeData2016.zip",
                      damaged_member(ade_zip(), payload(ADE_VAL[1])))
    done = run_command([sys.executable, "download_ade20k.py", str(tmp_path / "data"), "--ade-url", source.as_uri(),
                        "--ade-checksum", "none", "--expect-train", "3", "--expect-val", "2"], {})
    line = one_error_line(done)
    assert f"Bad CRC-32 for file 'ADEChallengeData2016/images/validation/{ADE_VAL[1]}.jpg'" in line
    assert "was removed" in line and "python download_ade20k.py" in line
    assert not (tmp_path / "data" / "downloads" / "ADEChallengeData2016.zip").exists()
    assert not (tmp_path / "data" / "ADEChallengeData2016").exists() and not list((tmp_path / "data").glob(".*.partial"))
    assert source.is_file()  # the user's own copy is never touched


def test_a_damaged_archive_is_not_reused_on_the_next_run(tmp_path, served):
    """SegmentationClassAug.zip has no published checksum: only extraction can find it damaged."""
    good = served.files["SegmentationClassAug.zip"]
    served.files["SegmentationClassAug.zip"] = damaged_member(good, payload("aug" + SBD_ONLY[0], 300))
    with pytest.raises(DownloadError, match="SegmentationClassAug.zip could not be extracted .Bad CRC-32.*removed"):
        run_voc(tmp_path, served)
    assert not (tmp_path / "downloads" / "SegmentationClassAug.zip").exists()
    assert nothing_half_done(tmp_path)
    served.files["SegmentationClassAug.zip"] = good  # the server's copy is repaired
    run_voc(tmp_path, served)
    assert [start for name, start, _ in served.requests if name == "SegmentationClassAug.zip"] == [0, 0]
    assert list(split_files("voc", tmp_path, "train").ids) == TRAIN_AUG


def test_a_failed_content_check_names_the_kept_archives_to_delete(tmp_path, served):
    with pytest.raises(DownloadError) as caught:
        run_voc(tmp_path, served, counts=(10582, 1449))
    kept = [tmp_path / "downloads" / name for name in ("VOCtrainval_11-May-2012.tar", "SegmentationClassAug.zip")]
    assert all(path.is_file() for path in kept)
    assert f"(rm {' '.join(shlex.quote(str(path)) for path in kept)})" in str(caught.value)


def test_a_root_that_is_a_file_is_one_line(tmp_path, served):
    some_file = put_file(tmp_path / "some_file", b"mine")
    done = run_command([sys.executable, "download_ade20k.py", str(some_file)], {"MBS_ADE_URL": served.url("ADE.zip")})
    assert one_error_line(done).startswith(f"error: {some_file} is a file, not a folder")
    assert some_file.read_bytes() == b"mine" and served.requests == []


@pytest.mark.parametrize("occupied, kind, named", [
    ("some_file", "file", "some_file"),                                        # a data root below a file
    ("data/downloads", "file", "data/downloads"),
    ("data/downloads/VOCtrainval_11-May-2012.tar/", "folder", "data/downloads/VOCtrainval_11-May-2012.tar"),
    ("data/downloads/SegmentationClassAug.zip.part/", "folder", "data/downloads/SegmentationClassAug.zip.part"),
    ("data/VOCdevkit", "file", "data/VOCdevkit"),
    ("data/.VOC2012.partial", "file", "data/.VOC2012.partial"),
])
def test_a_path_of_the_wrong_kind_is_one_line_before_any_download(tmp_path, served, occupied, kind, named):
    if occupied.endswith("/"):
        (tmp_path / occupied).mkdir(parents=True)
    else:
        put_file(tmp_path / occupied, b"mine")
    root = tmp_path / ("some_file/data" if occupied == "some_file" else "data")
    with pytest.raises(DownloadError, match=f"^{tmp_path / named} is a {kind}, not a"):
        run_voc(root, served)
    assert served.requests == []


def test_the_text_files_are_read_and_written_as_utf8(tmp_path, served):
    """With the warning for a default (locale) encoding made an error in datasets.download, a VOC download still succeeds."""
    trainval, aug = voc_archives(served)
    command = [sys.executable, "-X", "warn_default_encoding", "-W", "error::EncodingWarning:datasets.download", "-c",
               "import sys; from datasets.download import main; sys.exit(main(sys.argv[1:]))",
               "voc", str(tmp_path), "--trainval-url", trainval.url, "--trainval-checksum", trainval.checksum,
               "--aug-url", aug.url, "--expect-train", "5", "--expect-val", "2"]
    done = run_command(command, {})
    assert done.returncode == 0, done.stderr
    assert list(split_files("voc", tmp_path, "train").ids) == TRAIN_AUG


# --- a full disk (a real one: a small tmpfs in a private mount namespace) --------------------------

SMALL_DISK = "2m"
ON_SMALL_DISK = """mount -t tmpfs -o "size=$SMALL_DISK_SIZE" mbs-test "$SMALL_DISK" || exit 97
"$@"; status=$?
ls -A "$SMALL_DISK/data" > "$SMALL_DISK_LISTING" 2>&1
exit $status"""


@pytest.fixture(scope="module")
def small_disk_works(tmp_path_factory):
    """Skip, saying why, where a tmpfs cannot be mounted in a private mount namespace (needs root or CAP_SYS_ADMIN)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=1m",
                            "mbs-probe", str(tmp_path_factory.mktemp("probe"))], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}")


def run_on_a_small_disk(tmp_path: Path, command: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``command`` with ``tmp_path/small`` a SMALL_DISK tmpfs, seen only by it and gone when it ends; also return
    what the data root ``small/data`` held at the end."""
    small, listing = tmp_path / "small", tmp_path / "listing.txt"
    small.mkdir()
    env = {"SMALL_DISK": str(small), "SMALL_DISK_SIZE": SMALL_DISK, "SMALL_DISK_LISTING": str(listing)}
    done = run_command(["unshare", "--mount", "--propagation", "private", "sh", "-c", ON_SMALL_DISK, "sh", *command], env)
    assert done.returncode != 97, f"the tmpfs was not mounted: {done.stderr}"
    return done, listing.read_text().split()


ZEROS = b"\0" * (8 << 20)  # 8 MiB that compress to a few kB: the archive fits on the small disk, its content not


@pytest.mark.parametrize("dataset", ["ade", "voc"])
def test_a_full_disk_during_extraction_is_one_line(tmp_path, served, small_disk_works, dataset):
    mirror = tmp_path / "mirror"
    if dataset == "ade":
        source = put_file(mirror / "ADE.zip", ade_zip({"ADEChallengeData2016/images/training/zeros.bin": ZEROS},
                                                      compression=zipfile.ZIP_DEFLATED))
        command = [sys.executable, "download_ade20k.py", "--ade-url", source.as_uri(), "--ade-checksum", "none"]
    else:
        source = put_file(mirror / "VOC.tar.gz", gzip.compress(voc_trainval_tar({"VOCdevkit/VOC2012/zeros.bin": ZEROS})))
        command = ["bash", "download_voc.sh", "--trainval-url", source.as_uri(), "--trainval-checksum", "none",
                   "--aug-url", served.url("SegmentationClassAug.zip")]
    assert source.stat().st_size < 1 << 20
    done, left = run_on_a_small_disk(tmp_path, [*command, str(tmp_path / "small" / "data")])
    line = one_error_line(done)
    assert f"no space left in {tmp_path / 'small' / 'data'} while extracting" in line
    assert "the extracted data needs about 8.4 MB" in line  # 8 MiB of zeros and the small files
    assert left == ["downloads"]  # the half-extracted .partial folder is gone, the archives are kept


def test_a_full_disk_during_the_download_is_one_line_without_retries(tmp_path, small_disk_works):
    source = put_file(tmp_path / "mirror" / "ADE.zip", ade_zip({"big.bin": payload("big", 3 << 20)}))  # 3 MiB > 2m
    started = time.monotonic()
    done, left = run_on_a_small_disk(tmp_path, [sys.executable, "download_ade20k.py", "--ade-url", source.as_uri(),
                                                "--ade-checksum", "none", str(tmp_path / "small" / "data")])
    assert time.monotonic() - started < 5  # no retries: they are for the network
    line = one_error_line(done)
    assert f"no space left in {tmp_path / 'small' / 'data' / 'downloads'} to download the ADE20K SceneParsing zip" in line
    assert "rerun `python download_ade20k.py" in line and left == ["downloads"]
