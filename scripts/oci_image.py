"""mandate: a small, reproducible OCI image-layout writer for scripts/package and
scripts/package-minter (no Docker daemon, no image builder).

Reproducible by construction: every time is SOURCE_DATE_EPOCH (default: HEAD's commit time);
tar entries are sorted, owned by uid/gid 0 (unless said otherwise) with no owner names; gzip
writes no file name and mtime 0 at a fixed level; JSON has sorted keys and no whitespace.
"""

import datetime
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
GZIP_LEVEL = 6  # gzip(1)'s default: near level 9's size at a quarter of the time


def log(msg):
    print(f"[package] {msg}", file=sys.stderr)


def die(msg):
    sys.exit(f"[package] error: {msg}")


def git(*args):
    try:
        out = subprocess.run(["git", "-C", ROOT, *args], check=True, capture_output=True, text=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def workspace_version():
    with open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8") as f:
        text = f.read()
    section = re.search(r"^\[workspace\.package\]\s*$(.*?)(?=^\[)", text, re.M | re.S)
    m = section and re.search(r'^version\s*=\s*"([^"]+)"', section.group(1), re.M)
    if not m:
        die("no [workspace.package] version in Cargo.toml")
    return m.group(1)


def default_source():
    env = os.environ.get("MANDATE_IMAGE_SOURCE")
    if env:
        return env
    url = git("remote", "get-url", "origin") or ""
    # Only a URL someone else can fetch; a local path would make the image machine-specific.
    return url if re.match(r"^(https://|ssh://|git@)", url) else None


def revision():
    rev = git("rev-parse", "HEAD")
    if rev and git("status", "--porcelain", "--untracked-files=no"):
        log("warning: the work tree has uncommitted changes; revision is marked -dirty")
        rev += "-dirty"
    return rev


def source_date_epoch():
    epoch = os.environ.get("SOURCE_DATE_EPOCH") or git("log", "-1", "--format=%ct")
    if not epoch or not epoch.isdigit():
        die("set SOURCE_DATE_EPOCH (no git commit to take the time from)")
    return int(epoch)


def rfc3339(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value):
    # Sorted keys, no whitespace: the same document always hashes to the same digest.
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def tar_bytes(entries, mtime):
    """A tar of `entries`, sorted by path. Each entry is a dict: path (relative, no leading /),
    and one of data (bytes: a regular file), dir=True, or link (a symlink target); optional
    mode (default 0644 files, 0755 directories, 0777 links), uid and gid (default 0)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for e in sorted(entries, key=lambda e: e["path"]):
            info = tarfile.TarInfo(e["path"])
            info.mtime = mtime
            info.uid = e.get("uid", 0)
            info.gid = e.get("gid", 0)
            info.uname = info.gname = ""
            data = None
            if e.get("dir"):
                info.type = tarfile.DIRTYPE
                info.mode = e.get("mode", 0o755)
            elif "link" in e:
                info.type = tarfile.SYMTYPE
                info.linkname = e["link"]
                info.mode = e.get("mode", 0o777)
            else:
                info.type = tarfile.REGTYPE
                info.mode = e.get("mode", 0o644)
                info.size = len(e["data"])
                data = io.BytesIO(e["data"])
            tar.addfile(info, data)
    return buf.getvalue()


def gzip_bytes(data):
    buf = io.BytesIO()
    # filename="" and mtime=0: no name and no time in the gzip header.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=GZIP_LEVEL, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def write_image(out, tag, config, tar, manifest_annotations, layer_annotations=None):
    """Writes an OCI layout at `out` (replacing it) holding one image: `config` (a dict; its
    rootfs.diff_ids are filled in here) and one gzip'd layer from `tar`. Returns the manifest
    digest."""
    layer = gzip_bytes(tar)
    config = dict(config)
    config["rootfs"] = {"type": "layers", "diff_ids": [sha256(tar)]}
    config_bytes = canonical_json(config)
    layer_desc = {"mediaType": MT_LAYER, "digest": sha256(layer), "size": len(layer)}
    if layer_annotations:
        layer_desc["annotations"] = layer_annotations
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": sha256(config_bytes), "size": len(config_bytes)},
        "layers": [layer_desc],
        "annotations": manifest_annotations,
    })
    digest = sha256(manifest)
    index = canonical_json({
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": digest,
            "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    })

    # A fresh layout each time: no stale blobs or tags from an earlier build.
    out = os.path.abspath(out)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    blobs = os.path.join(tmp, "blobs", "sha256")
    os.makedirs(blobs)
    for blob in (layer, config_bytes, manifest):
        with open(os.path.join(blobs, hashlib.sha256(blob).hexdigest()), "wb") as f:
            f.write(blob)
    with open(os.path.join(tmp, "oci-layout"), "wb") as f:
        f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))
    with open(os.path.join(tmp, "index.json"), "wb") as f:
        f.write(index)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    log(f"{out}:{tag}  layer {len(layer)} bytes, created {config.get('created')}")
    return digest


def common_annotations(title, description, version, created, source):
    ann = {
        "org.opencontainers.image.title": title,
        "org.opencontainers.image.description": description,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    rev = revision()
    if rev:
        ann["org.opencontainers.image.revision"] = rev
    if source:
        ann["org.opencontainers.image.source"] = source
    else:
        log("note: no org.opencontainers.image.source (pass --source or set MANDATE_IMAGE_SOURCE)")
    return ann
