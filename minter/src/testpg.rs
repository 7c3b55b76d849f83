//! A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` into a temporary
//! directory, listening only on a Unix socket in it (no TCP port to collide on), stopped and
//! removed on drop. As root the server runs as the `postgres` user (`runuser`), since
//! PostgreSQL refuses to run as root.
//!
//! The binaries are found on `PATH` or under `/usr/lib/postgresql/*/bin` (Debian's layout;
//! `scripts/setup` installs the `postgresql` package). Missing binaries skip the caller's test
//! ([`TestPg::start`] returns `None`), unless `MANDATE_REQUIRE_POSTGRES=1` (set by
//! `scripts/test`), which makes it an error.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestPg {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    fsync: bool,
    /// Listening on 127.0.0.1 too (TLS).
    tcp: bool,
    pub port: u16,
}

/// The directory holding `initdb`, `pg_ctl` and `createdb`, if PostgreSQL is installed.
pub fn find_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&p) {
            // Debian links a few tools into /usr/local/bin: the others sit beside the target.
            let Ok(initdb) = std::fs::canonicalize(d.join("initdb")) else { continue };
            if let Some(dir) = initdb.parent().filter(|dir| ["pg_ctl", "createdb", "postgres"].iter().all(|t| dir.join(t).is_file())) {
                return Some(dir.to_path_buf());
            }
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl TestPg {
    /// Starts a cluster (`fsync` off: tests; see [`TestPg::start_durable`]). `Ok(None)`: no
    /// PostgreSQL here and not required.
    pub fn start() -> Result<Option<TestPg>> {
        Self::start_with(false)
    }

    /// A cluster with `fsync` on, as in production (benchmarks).
    pub fn start_durable() -> Result<Option<TestPg>> {
        Self::start_with(true)
    }

    fn start_with(fsync: bool) -> Result<Option<TestPg>> {
        let Some(bin) = find_bin() else {
            if std::env::var("MANDATE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                bail!("PostgreSQL server binaries (initdb, pg_ctl) not found and MANDATE_REQUIRE_POSTGRES=1: run scripts/setup");
            }
            eprintln!("testpg: PostgreSQL binaries not found; skipping (set MANDATE_REQUIRE_POSTGRES=1 to fail instead)");
            return Ok(None);
        };
        let dir = std::env::temp_dir().join(format!("mandate-pg-{}", crate::exchange::random_id().replace(['-', '_'], "x")));
        std::fs::create_dir_all(&dir)?;
        let as_postgres = is_root();
        let pg = TestPg { dir, bin, as_postgres, fsync, tcp: false, port: 5432 };
        if as_postgres {
            let ok = Command::new("chown").arg("postgres:").arg(&pg.dir).status().context("chown")?.success();
            if !ok {
                bail!("cannot chown {} to the postgres user (is the postgresql package installed?)", pg.dir.display());
            }
        }
        pg.run("initdb", &["-D", &pg.data(), "-U", "mandate", "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"])?;
        pg.start_again()?;
        Ok(Some(pg))
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// The socket directory (the `host` of a connection string).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).current_dir(&self.dir).output().with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!("{tool} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// (Re)starts the server and waits until it accepts connections.
    pub fn start_again(&self) -> Result<()> {
        let opts = format!(
            "-c listen_addresses='{}' -k {} -p {} -c fsync={} -c max_connections=300 -c shared_buffers=32MB",
            if self.tcp { "127.0.0.1" } else { "" },
            self.dir.display(),
            self.port,
            if self.fsync { "on" } else { "off" }
        );
        let log = self.dir.join("server.log").display().to_string();
        self.run("pg_ctl", &["-D", &self.data(), "-l", &log, "-o", &opts, "-w", "-t", "60", "start"])
    }

    /// Serves TLS with `cert_pem`/`key_pem` on 127.0.0.1 at a free TCP port (PostgreSQL does
    /// TLS over TCP only); restarts the server. Returns the port.
    pub fn enable_tls(&mut self, cert_pem: &str, key_pem: &str) -> Result<u16> {
        let data = self.dir.join("data");
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            std::fs::write(&path, pem)?;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            if self.as_postgres {
                Command::new("chown").arg("postgres:").arg(&path).status()?;
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str("\nssl = on\nlisten_addresses = '127.0.0.1'\n");
        std::fs::write(&conf, text)?;
        self.stop()?;
        self.port = port;
        self.tcp = true;
        self.start_again()?;
        Ok(port)
    }

    /// Stops the server (fast shutdown: open transactions are rolled back).
    pub fn stop(&self) -> Result<()> {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "-t", "60", "stop"])
    }

    /// A connection string for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("host={} port={} user=mandate dbname={db}", self.dir.display(), self.port)
    }

    /// Creates database `name`.
    pub fn create_db(&self, name: &str) -> Result<()> {
        let host = self.dir.display().to_string();
        let port = self.port.to_string();
        self.run("createdb", &["-h", &host, "-p", &port, "-U", "mandate", name])
    }

    /// The server log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The `store.postgres` configuration object for database `db`.
    pub fn store_config(&self, db: &str) -> serde_json::Value {
        serde_json::json!({"postgres": {"url": self.url(db), "pool_size": 8, "timeout_ms": 2000}})
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        let _ = self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "-t", "30", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

