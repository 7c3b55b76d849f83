//! The filter as an OCI image (`scripts/package`, docs/packaging.md), end to end through a real
//! registry: package twice (same digest, byte-identical layouts), push with skopeo to a
//! `docker-registry` on loopback, pull the manifest, config and layer back over the registry's
//! HTTP API and check everything Istio's and Envoy Gateway's fetchers rely on: the manifest
//! digest is the one `scripts/package` printed, the last (only) layer is
//! `application/vnd.oci.image.layer.v1.tar+gzip` holding just `plugin.wasm`, and that file is
//! the built module, byte for byte.
//!
//! Needs python3, skopeo, docker-registry, tar, gzip and git (scripts/setup installs the Debian
//! ones) and the built module. Skipped when one is missing, unless `MANDATE_REQUIRE_ENVOY` is set.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mandate_e2e::{http_get, workspace_root, REQUIRE_ENV};
use serde_json::Value;
use sha2::{Digest, Sha256};

const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const SOURCE: &str = "https://example.invalid/mandate";
const TAG: &str = "e2e";

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// The module, or `None` (skipped) when it or a tool is missing and `MANDATE_REQUIRE_ENVOY` is
/// unset; with it set, a missing piece fails the test.
fn prerequisites(test: &str) -> Option<PathBuf> {
    let mut missing: Vec<String> = ["python3", "skopeo", "docker-registry", "tar", "gzip", "git"]
        .into_iter()
        .filter(|t| !on_path(t))
        .map(|t| format!("{t} not on PATH (scripts/setup installs skopeo and docker-registry)"))
        .collect();
    let wasm = match mandate_e2e::plugin_wasm() {
        Ok(p) => Some(p),
        Err(e) => {
            missing.push(e.to_string());
            None
        }
    };
    if missing.is_empty() {
        return wasm;
    }
    let why = missing.join("; ");
    if std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty()) {
        panic!("{test}: {REQUIRE_ENV} is set but prerequisites are missing: {why}");
    }
    eprintln!("SKIPPED {test}: {why}. Set {REQUIRE_ENV}=1 to make this a failure.");
    None
}

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn run_text(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8(run(cmd)?)?.trim().to_string())
}

/// Runs `scripts/package` into `out`; returns the digest it printed.
fn package(wasm: &Path, out: &Path, epoch: Option<&str>) -> Result<String> {
    let root = workspace_root();
    let mut cmd = Command::new(root.join("scripts/package"));
    cmd.current_dir(&root)
        .arg("--wasm")
        .arg(wasm)
        .arg("--out")
        .arg(out)
        .args(["--tag", TAG, "--source", SOURCE])
        .env_remove("MANDATE_IMAGE_SOURCE");
    match epoch {
        Some(e) => cmd.env("SOURCE_DATE_EPOCH", e),
        None => cmd.env_remove("SOURCE_DATE_EPOCH"),
    };
    let digest = run_text(&mut cmd)?;
    ensure!(
        digest.len() == 71 && digest.starts_with("sha256:"),
        "scripts/package printed {digest:?}, not a digest alone"
    );
    Ok(digest)
}

/// Every file under `dir`, relative path → bytes, sorted.
fn tree(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir)?.to_string_lossy().into_owned();
                out.push((rel, fs::read(&p)?));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The layout on disk is self-consistent: every blob is named by its sha256, index.json names
/// the manifest under `TAG`, and that manifest's digest is the printed one.
fn check_layout(dir: &Path, digest: &str) -> Result<()> {
    let layout: Value = serde_json::from_slice(&fs::read(dir.join("oci-layout"))?)?;
    ensure!(layout["imageLayoutVersion"] == "1.0.0", "oci-layout: {layout}");
    for (rel, bytes) in tree(&dir.join("blobs/sha256"))? {
        ensure!(sha256_hex(&bytes) == rel, "blob {rel} does not hash to its name");
    }
    let index: Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
    let m = &index["manifests"];
    ensure!(m.as_array().map(Vec::len) == Some(1), "index.json: {index}");
    ensure!(m[0]["digest"] == digest, "index.json names {} not {digest}", m[0]["digest"]);
    ensure!(m[0]["mediaType"] == MT_MANIFEST, "index.json: {index}");
    ensure!(m[0]["annotations"]["org.opencontainers.image.ref.name"] == TAG, "index.json: {index}");
    Ok(())
}

/// `docker-registry` on a free loopback port with its storage in `dir`; killed on drop.
struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Registry {
    /// The port is picked free and then handed over, so another process may take it first:
    /// a registry that exits at start is retried on another port, twice.
    fn start(dir: &Path) -> Result<Registry> {
        let mut attempt = 0;
        loop {
            match Registry::start_once(dir) {
                Err(e) if attempt < 2 && format!("{e:#}").contains("exited") => {
                    eprintln!("docker-registry did not start ({e:#}); another port");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn start_once(dir: &Path) -> Result<Registry> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let storage = dir.join("storage");
        fs::create_dir_all(&storage)?;
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )?;
        let log = dir.join("registry.log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(dir.join("registry.err"))?)
            .spawn()
            .context("starting docker-registry")?;
        let mut reg = Registry { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = http_get(&reg.url("/v2/"), &[]) {
                if r.status == 200 {
                    return Ok(reg);
                }
            }
            if let Some(status) = reg.child.try_wait()? {
                bail!("docker-registry exited ({status}): {}", reg.logs());
            }
            if Instant::now() > deadline {
                bail!("docker-registry not ready on port {port}: {}", reg.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn logs(&self) -> String {
        let err = self.log.with_file_name("registry.err");
        format!(
            "{}{}",
            fs::read_to_string(&self.log).unwrap_or_default(),
            fs::read_to_string(err).unwrap_or_default()
        )
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- docker-registry log ---\n{}", self.logs());
        }
    }
}

/// GET `path` from the registry; checks 200 and returns the body and `Docker-Content-Digest`.
fn pull(reg: &Registry, path: &str, accept: &str) -> Result<(Vec<u8>, Option<String>)> {
    let r = http_get(&reg.url(path), &[("accept", accept)])?;
    ensure!(r.status == 200, "GET {path}: {} {}", r.status, r.text());
    Ok((r.body.clone(), r.header("docker-content-digest").map(str::to_string)))
}

#[test]
fn oci_image_round_trips_through_a_registry() -> Result<()> {
    let Some(wasm_path) = prerequisites("oci_image_round_trips_through_a_registry") else {
        return Ok(());
    };
    let started = Instant::now();
    let wasm = fs::read(&wasm_path)?;
    let root = workspace_root();
    let tmp = tempfile::tempdir()?;

    // Reproducible: two runs, the same digest and byte-identical layouts.
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let digest = package(&wasm_path, &a, None)?;
    let again = package(&wasm_path, &b, None)?;
    assert_eq!(digest, again, "two packagings of one module and commit differ");
    assert!(tree(&a)? == tree(&b)?, "the two layouts differ byte-wise");
    check_layout(&a, &digest)?;
    // ... and the time really comes from SOURCE_DATE_EPOCH: another time, another image.
    let other = package(&wasm_path, &tmp.path().join("c"), Some("1"))?;
    assert_ne!(digest, other, "SOURCE_DATE_EPOCH did not change the image");

    // Push with skopeo, digests preserved (skopeo fails rather than rewrite the manifest).
    let reg = Registry::start(&tmp.path().join("registry"))?;
    let policy = tmp.path().join("policy.json");
    fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#)?;
    let pushed = tmp.path().join("pushed.digest");
    run(Command::new("skopeo")
        .arg("--policy")
        .arg(&policy)
        .args(["copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false", "--dest-no-creds"])
        .arg("--digestfile")
        .arg(&pushed)
        .arg(format!("oci:{}:{TAG}", a.display()))
        .arg(format!("docker://127.0.0.1:{}/mandate/plugin:{TAG}", reg.port)))?;
    assert_eq!(fs::read_to_string(&pushed)?.trim(), digest, "skopeo pushed another manifest");

    // The manifest, by tag and by digest: the registry names it by the digest scripts/package printed.
    let (by_tag, header) = pull(&reg, &format!("/v2/mandate/plugin/manifests/{TAG}"), MT_MANIFEST)?;
    assert_eq!(header.as_deref(), Some(digest.as_str()), "Docker-Content-Digest");
    assert_eq!(digest_of(&by_tag), digest, "the pulled manifest does not hash to the digest");
    let (by_digest, _) = pull(&reg, &format!("/v2/mandate/plugin/manifests/{digest}"), MT_MANIFEST)?;
    assert_eq!(by_tag, by_digest);
    let manifest: Value = serde_json::from_slice(&by_tag)?;
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], MT_MANIFEST);
    assert_eq!(manifest["config"]["mediaType"], MT_CONFIG);
    let layers = manifest["layers"].as_array().context("layers")?;
    assert_eq!(layers.len(), 1, "the compat variant has one layer: {manifest}");
    assert_eq!(layers[0]["mediaType"], MT_LAYER);

    // Annotations: version, revision, creation time (the commit's), source, the module's size and hash.
    let ann = &manifest["annotations"];
    let head = run_text(Command::new("git").arg("-C").arg(&root).args(["rev-parse", "HEAD"]))?;
    let commit_time = run_text(
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .env("TZ", "UTC")
            .args(["log", "-1", "--format=%cd", "--date=format-local:%Y-%m-%dT%H:%M:%SZ"]),
    )?;
    assert_eq!(ann["org.opencontainers.image.version"], env!("CARGO_PKG_VERSION"));
    let revision = ann["org.opencontainers.image.revision"].as_str().context("revision")?;
    assert!(revision == head || revision == format!("{head}-dirty"), "revision {revision} vs HEAD {head}");
    assert_eq!(ann["org.opencontainers.image.created"], commit_time.as_str());
    assert_eq!(ann["org.opencontainers.image.source"], SOURCE);
    assert_eq!(ann["mandate.wasm.size"], wasm.len().to_string());
    assert_eq!(ann["mandate.wasm.sha256"], sha256_hex(&wasm));

    // The config blob.
    let config_digest = manifest["config"]["digest"].as_str().context("config digest")?;
    let (config_bytes, _) = pull(&reg, &format!("/v2/mandate/plugin/blobs/{config_digest}"), MT_CONFIG)?;
    assert_eq!(digest_of(&config_bytes), config_digest);
    assert_eq!(manifest["config"]["size"], config_bytes.len());
    let config: Value = serde_json::from_slice(&config_bytes)?;
    assert_eq!(config["architecture"], "wasm");
    assert_eq!(config["os"], "wasip1");
    assert_eq!(config["created"], commit_time.as_str());

    // The layer: a gzip'd tar of exactly `plugin.wasm`, root-owned, the built module byte for
    // byte; its uncompressed digest is the config's diff_id. Unpacked with tar and gzip, not
    // with the Python that wrote it.
    let layer_digest = layers[0]["digest"].as_str().context("layer digest")?;
    let (layer, _) = pull(&reg, &format!("/v2/mandate/plugin/blobs/{layer_digest}"), MT_LAYER)?;
    assert_eq!(digest_of(&layer), layer_digest);
    assert_eq!(layers[0]["size"], layer.len());
    let layer_file = tmp.path().join("layer.tar.gz");
    fs::write(&layer_file, &layer)?;
    let listing = run_text(Command::new("tar").arg("--numeric-owner").arg("-tvzf").arg(&layer_file))?;
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 1, "the layer holds more than plugin.wasm:\n{listing}");
    assert!(
        lines[0].starts_with("-rw-r--r-- 0/0 ") && lines[0].ends_with(" plugin.wasm"),
        "layer entry: {}",
        lines[0]
    );
    let pulled = run(Command::new("tar").arg("-xzOf").arg(&layer_file).arg("plugin.wasm"))?;
    assert_eq!(sha256_hex(&pulled), sha256_hex(&wasm), "the pulled module is not the built one");
    let tar = run(Command::new("gzip").arg("-dc").arg(&layer_file))?;
    assert_eq!(config["rootfs"]["diff_ids"][0], digest_of(&tar));

    eprintln!(
        "oci round trip: {digest} (module {} bytes, layer {} bytes) in {:.1}s",
        wasm.len(),
        layer.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The built `mandate-minter` (`target/debug`, which `cargo build --workspace` makes), or `None`
/// (skipped) when it or a tool is missing and `MANDATE_REQUIRE_ENVOY` is unset.
fn minter_prerequisites(test: &str) -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let target = if target.is_absolute() { target } else { workspace_root().join(target) };
    let bin = target.join("debug/mandate-minter");
    let mut missing: Vec<String> = ["python3", "tar", "ldd", "git"]
        .into_iter()
        .filter(|t| !on_path(t))
        .map(|t| format!("{t} not on PATH"))
        .collect();
    if !bin.is_file() {
        missing.push(format!("{} not built (cargo build -p mandate-minter)", bin.display()));
    }
    if missing.is_empty() {
        return Some(bin);
    }
    let why = missing.join("; ");
    if std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty()) {
        panic!("{test}: {REQUIRE_ENV} is set but prerequisites are missing: {why}");
    }
    eprintln!("SKIPPED {test}: {why}. Set {REQUIRE_ENV}=1 to make this a failure.");
    None
}

fn package_minter(bin: &Path, out: &Path) -> Result<String> {
    let root = workspace_root();
    let digest = run_text(
        Command::new(root.join("scripts/package-minter"))
            .current_dir(&root)
            .arg("--bin")
            .arg(bin)
            .arg("--out")
            .arg(out)
            .args(["--tag", TAG, "--source", SOURCE])
            .env_remove("SOURCE_DATE_EPOCH"),
    )?;
    ensure!(digest.len() == 71 && digest.starts_with("sha256:"), "scripts/package-minter printed {digest:?}");
    Ok(digest)
}

/// A blob of the layout at `dir` by digest, checked against it.
fn blob(dir: &Path, digest: &str) -> Result<Vec<u8>> {
    let hex = digest.strip_prefix("sha256:").context("not a sha256 digest")?;
    let bytes = fs::read(dir.join("blobs/sha256").join(hex))?;
    ensure!(sha256_hex(&bytes) == hex, "blob {digest} does not hash to its name");
    Ok(bytes)
}

#[test]
fn minter_image_holds_the_built_binary_and_runs_as_non_root() -> Result<()> {
    let Some(bin) = minter_prerequisites("minter_image_holds_the_built_binary_and_runs_as_non_root") else {
        return Ok(());
    };
    let started = Instant::now();
    let binary = fs::read(&bin)?;
    let tmp = tempfile::tempdir()?;
    let a = tmp.path().join("a");
    let digest = package_minter(&bin, &a)?;
    let again = package_minter(&bin, &tmp.path().join("b"))?;
    assert_eq!(digest, again, "two packagings of one binary and commit differ");
    check_layout(&a, &digest)?;

    let manifest: Value = serde_json::from_slice(&blob(&a, &digest)?)?;
    assert_eq!(manifest["mediaType"], MT_MANIFEST);
    assert_eq!(manifest["config"]["mediaType"], MT_CONFIG);
    assert_eq!(manifest["annotations"]["mandate.minter.sha256"], sha256_hex(&binary));
    let config: Value =
        serde_json::from_slice(&blob(&a, manifest["config"]["digest"].as_str().context("config")?)?)?;
    let c = &config["config"];
    assert_eq!(c["User"], "65532:65532", "the image must run as the non-root user: {config}");
    assert_eq!(c["Entrypoint"], serde_json::json!(["/usr/local/bin/mandate-minter"]));
    assert!(c["ExposedPorts"]["8443/tcp"].is_object(), "ExposedPorts: {config}");
    assert_eq!(config["os"], "linux");

    let layers = manifest["layers"].as_array().context("layers")?;
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], MT_LAYER);
    let layer = blob(&a, layers[0]["digest"].as_str().context("layer digest")?)?;
    let layer_file = tmp.path().join("layer.tar.gz");
    fs::write(&layer_file, &layer)?;
    let tar = run(Command::new("gzip").arg("-dc").arg(&layer_file))?;
    assert_eq!(config["rootfs"]["diff_ids"][0], digest_of(&tar));

    // Unpacked with tar: the binary is the built one, byte for byte, and every library ldd
    // names for it is there; the state directory belongs to the non-root user.
    let rootfs = tmp.path().join("rootfs");
    fs::create_dir(&rootfs)?;
    run(Command::new("tar").arg("-xzf").arg(&layer_file).arg("-C").arg(&rootfs).arg("--numeric-owner"))?;
    let inside = fs::read(rootfs.join("usr/local/bin/mandate-minter"))?;
    assert_eq!(sha256_hex(&inside), sha256_hex(&binary), "the binary in the layer is not the built one");
    assert!(rootfs.join("etc/ssl/certs/ca-certificates.crt").is_file());
    let ldd = run_text(Command::new("ldd").arg(&bin))?;
    for line in ldd.lines() {
        let path = match line.split(" => ").nth(1) {
            Some(rest) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if let Some(relative) = path.strip_prefix('/') {
            assert!(rootfs.join(relative).is_file(), "{path} (from ldd) missing from the image");
        }
    }
    let listing = run_text(Command::new("tar").arg("--numeric-owner").arg("-tvzf").arg(&layer_file))?;
    assert!(
        listing.lines().any(|l| l.contains(" 65532/65532 ") && l.ends_with("var/lib/mandate-minter/")),
        "state directory not owned by 65532:\n{listing}"
    );

    // As root (CI), run the image's entrypoint in its own root as the image's user: the libraries
    // are complete and the binary needs no root.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 && on_path("chroot") {
        let out = run_text(
            Command::new("chroot")
                .arg("--userspec=65532:65532")
                .arg(&rootfs)
                .arg("/usr/local/bin/mandate-minter")
                .arg("--version"),
        )?;
        assert!(out.starts_with("mandate-minter "), "--version in the image: {out}");
        serve_in_chroot(&rootfs)?;
    } else {
        eprintln!("note: not root; the image's entrypoint was not run in a chroot");
    }
    eprintln!(
        "minter image: {digest} (binary {} bytes, layer {} bytes) in {:.1}s",
        binary.len(),
        layer.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A child process killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves from the unpacked image as 65532 (dev config on a loopback port, state in the image's
/// `/var/lib/mandate-minter`) and checks `GET /healthz`.
fn serve_in_chroot(rootfs: &Path) -> Result<()> {
    use std::io::{BufRead, BufReader};
    fs::write(
        rootfs.join("etc/mandate-minter/minter.json"),
        serde_json::json!({
            "dev": true,
            "listen": "127.0.0.1:0",
            "issuer": "https://minter.test",
            "state_dir": "/var/lib/mandate-minter",
            "identity": {"audiences": ["mandate-minter"], "trust_domains": [{"name": "example.org",
                "bundle": {"inline": {"keys": [{"kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": "k1",
                    "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                    "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}}}]},
            "client_auth": {"mode": "none_loopback"}
        })
        .to_string(),
    )?;
    let mut child = Killed(
        Command::new("chroot")
            .arg("--userspec=65532:65532")
            .arg(rootfs)
            .args(["/usr/local/bin/mandate-minter", "--config", "/etc/mandate-minter/minter.json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("chroot mandate-minter")?,
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().context("stdout")?).read_line(&mut line)?;
    let bound: Value = serde_json::from_str(&line).with_context(|| format!("first line {line:?}"))?;
    let addr = bound["listening"].as_str().context("no listening address")?;
    let health = http_get(&format!("http://{addr}/healthz"), &[])?;
    assert_eq!(health.status, 200, "/healthz: {}", health.text());
    assert_eq!(health.json()?["status"], "ok");
    assert!(rootfs.join("var/lib/mandate-minter/minter.sqlite3").is_file(), "no state written as 65532");
    Ok(())
}
