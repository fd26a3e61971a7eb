//! `REPBLOCK_FAULTS`: the fault specification, the wrapper that reads it,
//! and the `trigger=PATH` file that arms faults while the process runs.

use std::sync::Arc;

use super::{FAULTS_ENV, FaultEngine};
use crate::io::IoEngine;

/// Faults requested through `REPBLOCK_FAULTS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultSpec {
    /// `sync_error_after=N:ERRNO`
    pub sync_error_after: Option<(u64, i32)>,
    /// `write_error_after=N:ERRNO`
    pub write_error_after: Option<(u64, i32)>,
    /// `seed=N` (default 0)
    pub seed: u64,
}

/// Parses a fault specification such as
/// `"sync_error_after=3:EIO,write_error_after=100:ENOSPC,seed=7"`.
/// Errnos are given by name (EIO, ENOSPC, EROFS, EDQUOT, EFBIG, ENOMEM) or
/// number. Unknown keys or bad values are an error naming the key.
pub fn parse_fault_spec(s: &str) -> Result<FaultSpec, String> {
    let mut spec = FaultSpec::default();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (key, value) = item.split_once('=').ok_or_else(|| format!("{FAULTS_ENV}: `{item}` is not key=value"))?;
        let key = key.trim();
        let value = value.trim();
        match key {
            "sync_error_after" => spec.sync_error_after = Some(parse_after(key, value)?),
            "write_error_after" => spec.write_error_after = Some(parse_after(key, value)?),
            "seed" => {
                spec.seed =
                    value.parse().map_err(|_| format!("{FAULTS_ENV}: seed: `{value}` is not an unsigned integer"))?
            }
            _ => {
                return Err(format!(
                    "{FAULTS_ENV}: unknown key `{key}` (expected sync_error_after, write_error_after, seed, trigger)"
                ));
            }
        }
    }
    Ok(spec)
}

fn parse_after(key: &str, value: &str) -> Result<(u64, i32), String> {
    let (n, errno) =
        value.split_once(':').ok_or_else(|| format!("{FAULTS_ENV}: {key}: `{value}` is not COUNT:ERRNO"))?;
    let n: u64 =
        n.trim().parse().map_err(|_| format!("{FAULTS_ENV}: {key}: count `{n}` is not an unsigned integer"))?;
    let errno = parse_errno(errno.trim()).ok_or_else(|| format!("{FAULTS_ENV}: {key}: unknown errno `{errno}`"))?;
    Ok((n, errno))
}

fn parse_errno(s: &str) -> Option<i32> {
    let named = match s.to_ascii_uppercase().as_str() {
        "EIO" => Some(libc::EIO),
        "ENOSPC" => Some(libc::ENOSPC),
        "EROFS" => Some(libc::EROFS),
        "EDQUOT" => Some(libc::EDQUOT),
        "EFBIG" => Some(libc::EFBIG),
        "ENOMEM" => Some(libc::ENOMEM),
        _ => None,
    };
    named.or_else(|| s.parse::<i32>().ok().filter(|n| (1..4096).contains(n)))
}

/// Wraps `engine` per the test-only environment variable REPBLOCK_FAULTS, e.g.
/// "sync_error_after=3:EIO,write_error_after=100:ENOSPC"; returns `engine` unchanged when unset.
/// Unknown keys or values → Err naming the key.
pub fn wrap_from_env(engine: Arc<dyn IoEngine>) -> Result<Arc<dyn IoEngine>, String> {
    match std::env::var(FAULTS_ENV) {
        Ok(s) if !s.trim().is_empty() => wrap_with_spec(engine, &s),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(engine),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{FAULTS_ENV}: not valid UTF-8")),
    }
}

/// [`wrap_from_env`] with the specification given.
///
/// Besides the keys of [`parse_fault_spec`], `trigger=PATH` arms faults
/// while the process runs (the fault campaign, `repbench chaos`, uses it):
/// a thread looks for the file PATH every 5 ms; when it appears it is read,
/// removed, and its content applied: `power-cut` makes a [`FaultEngine::power_cut`]
/// and then stops the process with SIGKILL at once, as a machine losing
/// power does (nothing after the cut reaches the disk; the engine refuses
/// every operation from the cut on); anything else is a specification such
/// as `write_error_after=10:ENOSPC` (a disk that fills up now).
pub fn wrap_with_spec(engine: Arc<dyn IoEngine>, spec: &str) -> Result<Arc<dyn IoEngine>, String> {
    let (rest, trigger) = split_trigger(spec)?;
    let parsed = parse_fault_spec(&rest)?;
    let fe = FaultEngine::new(engine, parsed.seed);
    fe.arm(&parsed);
    if let Some(path) = trigger {
        spawn_trigger(Arc::downgrade(&fe), path)?;
    }
    tracing::warn!(spec, "IO fault injection enabled ({FAULTS_ENV}); test use only");
    Ok(fe)
}

/// Takes the `trigger=PATH` item out of a specification.
fn split_trigger(spec: &str) -> Result<(String, Option<std::path::PathBuf>), String> {
    let mut rest = Vec::new();
    let mut trigger = None;
    for item in spec.split(',') {
        match item.split_once('=') {
            Some((k, v)) if k.trim() == "trigger" => {
                if v.trim().is_empty() {
                    return Err(format!("{FAULTS_ENV}: trigger: a file path is required"));
                }
                trigger = Some(std::path::PathBuf::from(v.trim()));
            }
            _ => rest.push(item),
        }
    }
    Ok((rest.join(","), trigger))
}

/// The thread behind `trigger=PATH` (see [`wrap_with_spec`]); it ends with
/// the engine.
fn spawn_trigger(engine: std::sync::Weak<FaultEngine>, path: std::path::PathBuf) -> Result<(), String> {
    let poll = move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(5));
            let Some(fe) = engine.upgrade() else { return };
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            let _ = std::fs::remove_file(&path);
            let cmd = text.trim();
            if cmd == "power-cut" {
                let report = fe.power_cut();
                tracing::warn!(?report, "fault injection: power cut by trigger; the process stops now (SIGKILL)");
                // SAFETY: kill(2) of this very process with a signal that
                // cannot be caught; no memory is touched.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                return;
            }
            match parse_fault_spec(cmd) {
                Ok(spec) => fe.arm(&spec),
                Err(e) => tracing::error!(path = %path.display(), error = %e, "fault injection: bad trigger"),
            }
        }
    };
    std::thread::Builder::new()
        .name("fault-trigger".into())
        .spawn(poll)
        .map(drop)
        .map_err(|e| format!("{FAULTS_ENV}: trigger: cannot start its thread: {e}"))
}

impl FaultEngine {
    /// Arms the sync and write faults of `spec`.
    fn arm(&self, spec: &FaultSpec) {
        if let Some((n, errno)) = spec.sync_error_after {
            self.fail_sync_after(n, errno);
        }
        if let Some((n, errno)) = spec.write_error_after {
            self.fail_writes_after(n, errno);
        }
    }
}
