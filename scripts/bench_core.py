#!/usr/bin/env python3
"""Where mandate's per-request time goes: runs `bench-core` (bench/src/bin/bench-core.rs)
natively and, when Node.js is installed, as wasm32-wasip1 under Node's WASI, i.e. in V8, the
engine Envoy runs the filter in (Node's V8 is older than Envoy's; compare splits, not absolutes).

    python3 scripts/bench_core.py [--quick] [--no-build] [--wasm PATH]

--wasm runs another build of bench-core.wasm (e.g. a profile experiment built with
CARGO_PROFILE_RELEASE_OPT_LEVEL=3 and its own CARGO_TARGET_DIR). See docs/performance.md.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Node's WASI runs `_start`. bench-core links mandate-core alone (no proxy-wasm shell); any import
# beyond WASI is a stub that throws, so a host call sneaking into the core would show here.
RUNNER = r"""
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
const [file, ...args] = process.argv.slice(2);
const wasi = new WASI({ version: 'preview1', args: ['bench-core', ...args], env: {}, preopens: {}, returnOnExit: true });
const mod = await WebAssembly.compile(await readFile(file));
const imports = wasi.getImportObject();
for (const i of WebAssembly.Module.imports(mod)) {
  if (i.module !== 'wasi_snapshot_preview1') {
    imports[i.module] ??= {};
    imports[i.module][i.name] = () => { throw new Error(`host call ${i.module}.${i.name}`); };
  }
}
const inst = await WebAssembly.instantiate(mod, imports);
process.exitCode = wasi.start({ exports: { memory: inst.exports.memory, _start: inst.exports._start } });
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--wasm", type=Path)
    a = ap.parse_args()
    extra = ["--quick"] if a.quick else []
    if not a.no_build:
        subprocess.run(["cargo", "build", "-q", "-p", "mandate-bench", "--bin", "bench-core", "--profile", "release-native"],
                       cwd=ROOT, check=True)
        if a.wasm is None:
            subprocess.run(["cargo", "build", "-q", "-p", "mandate-bench", "--bin", "bench-core", "--target", "wasm32-wasip1",
                            "--release"], cwd=ROOT, check=True)
    print("### native (release-native)", flush=True)
    subprocess.run([str(ROOT / "target/release-native/bench-core")] + extra, check=True)
    node = shutil.which("node")
    if not node:
        print("### wasm: skipped (node not installed)")
        return
    wasm = a.wasm or ROOT / "target/wasm32-wasip1/release/bench-core.wasm"
    print(f"### wasm32-wasip1 in V8 (node {subprocess.run([node, '--version'], capture_output=True, text=True).stdout.strip()}): {wasm}",
          flush=True)
    with tempfile.TemporaryDirectory() as d:
        runner = Path(d) / "run.mjs"
        runner.write_text(RUNNER)
        rc = subprocess.run([node, "--no-warnings", str(runner), str(wasm)] + extra).returncode
    sys.exit(rc)


if __name__ == "__main__":
    main()
