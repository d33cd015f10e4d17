//! `--config FILE` (or `LLMGENIE_CONFIG`): a TOML file of settings for any subcommand.
//!
//! Each key is a flag's name (`port = 8080`, `keep_alive = "10m"`, `models = ["smollm2-135m"]`);
//! it becomes the `LLMGENIE_*` environment variable of that flag unless the environment already
//! sets it, so the precedence is: command-line flag, then environment, then file, then default.
//! Secrets (`api_key`) are refused in files: keep them in the environment. The `[router]`
//! table holds the routing policy (`RouterConfig`), read by `serve`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Keys a file may set, with the environment variable each one feeds.
const KEYS: &[(&str, &str)] = &[
    ("host", "LLMGENIE_HOST"),
    ("port", "LLMGENIE_PORT"),
    ("models", "LLMGENIE_MODEL"),
    ("model", "LLMGENIE_MODEL"),
    ("device", "LLMGENIE_DEVICE"),
    ("threads", "LLMGENIE_THREADS"),
    ("models_dir", "LLMGENIE_MODELS"),
    ("kv_cache_type", "LLMGENIE_KV_CACHE_TYPE"),
    ("packed_cache", "LLMGENIE_PACKED_CACHE"),
    ("keep_alive", "LLMGENIE_KEEP_ALIVE"),
    ("max_models", "LLMGENIE_MAX_MODELS"),
    ("max_memory", "LLMGENIE_MAX_MEMORY"),
    ("max_body_bytes", "LLMGENIE_MAX_BODY_BYTES"),
    ("max_pending", "LLMGENIE_MAX_PENDING"),
    ("cors_origins", "LLMGENIE_CORS_ORIGINS"),
    ("shutdown_grace", "LLMGENIE_SHUTDOWN_GRACE"),
    ("default_model", "LLMGENIE_DEFAULT_MODEL"),
    ("claude_model", "LLMGENIE_CLAUDE_MODEL"),
    ("claude_base_url", "LLMGENIE_CLAUDE_BASE_URL"),
    (
        "stream_local_immediately",
        "LLMGENIE_STREAM_LOCAL_IMMEDIATELY",
    ),
];

/// The config path from `--config PATH`, `--config=PATH` or `LLMGENIE_CONFIG`.
fn config_path() -> Option<PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    for (i, a) in args.iter().enumerate() {
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
        if a == "--config" {
            return args.get(i + 1).map(PathBuf::from);
        }
    }
    std::env::var_os("LLMGENIE_CONFIG").map(PathBuf::from)
}

fn as_env_value(key: &str, v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| as_env_value(key, i))
            .collect::<Result<Vec<_>>>()?
            .join(","),
        _ => bail!("config key '{key}' must be a string, number, boolean or list"),
    })
}

/// Read the config file, if one is named, into the environment.
///
/// # Errors
/// The file cannot be read or parsed, or holds an unknown key or a secret.
pub fn apply() -> Result<()> {
    let Some(path) = config_path() else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
    for (key, value) in &table {
        if key == "router" {
            // Read by `serve` itself (`router_config`): a table, not a flag.
            continue;
        }
        if key == "api_key" {
            bail!(
                "config file {}: keep api_key out of files; set LLMGENIE_API_KEY",
                path.display()
            );
        }
        let Some((_, var)) = KEYS.iter().find(|(k, _)| k == key) else {
            let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
            bail!(
                "config file {}: unknown key '{key}'; known keys: {}",
                path.display(),
                known.join(", ")
            );
        };
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, as_env_value(key, value)?);
        }
    }
    Ok(())
}

/// The `[router]` table of the config file, if there is a file and it has one.
///
/// # Errors
/// The file cannot be read or parsed, or the table has an unknown key or a wrong type.
pub fn router_config() -> Result<llmgenie::router::policy::RouterConfig> {
    let Some(path) = config_path() else {
        return Ok(Default::default());
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let mut table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
    match table.remove("router") {
        None => Ok(Default::default()),
        Some(v) => v
            .try_into()
            .with_context(|| format!("config file {}: [router]", path.display())),
    }
}
