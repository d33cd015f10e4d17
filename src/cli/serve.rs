//! `llmgenie serve`: preload the models, then serve until SIGINT/SIGTERM.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use llmgenie::catalog::{models_dir, Catalog, CatalogError};
use llmgenie::model::select_device;
use llmgenie::registry::{Budget, KeepAlive, Registry};
use llmgenie::server::routed::Routing;
use llmgenie::server::{self, AppState, Limits};

use super::commands::apply_runtime;
use super::ServeArgs;

pub fn serve(args: ServeArgs) -> Result<()> {
    apply_runtime(&args.runtime)?;
    let catalog = Catalog::load(&args.runtime.models_dir.clone().unwrap_or_else(models_dir))?;
    let device = select_device(args.runtime.device)?;
    let models = if args.models.is_empty() {
        vec![catalog.default.clone()]
    } else {
        args.models.clone()
    };
    // Resolve every preloaded model now; a catalogue model that is missing is fetched first
    // (with a progress bar), so that `serve` works on a fresh clone.
    let mut preload = Vec::new();
    for m in &models {
        let (name, path) = match catalog.resolve(m) {
            Ok(found) => found,
            Err(CatalogError::NotDownloaded { name, .. }) => {
                tracing::warn!(model = %name, "not downloaded yet; fetching it");
                let path = llmgenie::pull::pull(&catalog, &name, true)?;
                (name, path)
            }
            Err(e) => return Err(e.into()),
        };
        preload.push((name, path));
    }
    let default = preload.first().map(|(n, _)| n.clone()).unwrap_or_default();
    let keep_alive =
        KeepAlive::parse(&args.keep_alive).map_err(|e| anyhow::anyhow!("--keep-alive: {e}"))?;
    let budget = Budget {
        max_models: args.max_models,
        max_bytes: args.max_memory.as_deref().map(parse_bytes).transpose()?,
    };
    let registry = Registry::with_policy(catalog, device, &default, keep_alive, budget);
    for (name, path) in &preload {
        registry.add_file(name, path);
        registry.pin(name);
    }
    let ip: IpAddr = args
        .host
        .parse()
        .with_context(|| format!("--host must be an IP address, got '{}'", args.host))?;
    let addr = SocketAddr::new(ip, args.port);
    let routing = routing(&args, &default)?;
    let state = AppState::new(
        registry.clone(),
        Limits {
            max_body_bytes: args.max_body_bytes,
            max_pending_per_model: args.max_pending.max(1),
            shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace),
        },
        routing,
    )
    .with_api_key(args.api_key.clone())
    .with_cors_origins(args.cors_origins.clone())
    .with_prompt_logging(args.log_prompts);
    let metrics_addr: Option<SocketAddr> = args
        .metrics_addr
        .as_deref()
        .map(|a| {
            a.parse()
                .with_context(|| format!("--metrics-addr must be IP:PORT, got '{a}'"))
        })
        .transpose()?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        registry.spawn_reaper(std::time::Duration::from_millis(250));
        for (name, _) in preload {
            let registry = registry.clone();
            // Loads run in the background: /health answers 503 until they are done.
            tokio::spawn(async move {
                if let Err(e) = registry.get(&name).await {
                    tracing::error!(model = %name, error = %e, "preload failed");
                }
            });
        }
        if let Some(maddr) = metrics_addr {
            let listener = tokio::net::TcpListener::bind(maddr)
                .await
                .with_context(|| format!("cannot listen on --metrics-addr {maddr}"))?;
            tracing::info!(url = %format!("http://{maddr}/metrics"), "metrics listening");
            let app = server::metrics_router(state.clone());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "metrics listener stopped");
                }
            });
        }
        server::serve(state, addr, shutdown_signal())
            .await
            .with_context(|| format!("cannot serve on {addr}"))
    })?;
    Ok(())
}

/// The router from `[router]` in the config file, with the flags on top.
fn routing(args: &ServeArgs, default_local: &str) -> Result<Routing> {
    let mut cfg = super::config_file::router_config()?;
    if let Some(m) = &args.default_model {
        cfg.default_model = m.clone();
    }
    if let Some(m) = &args.claude_model {
        cfg.claude_model = m.clone();
        if cfg.prices.model != *m {
            tracing::warn!(model = %m, priced = %cfg.prices.model, "the ledger's prices are for another Claude model; set [router.prices]");
        }
    }
    if let Some(u) = &args.claude_base_url {
        cfg.claude_base_url = u.clone();
    }
    cfg.stream_local_immediately |= args.stream_local_immediately;
    if cfg.local_model.is_none() {
        cfg.local_model = Some(default_local.to_string());
    }
    let claude = Routing::claude_config(&cfg);
    if claude.api_key.is_none() {
        tracing::warn!(
            "ANTHROPIC_API_KEY is not set: escalation to Claude is off; answers stay local"
        );
    }
    Ok(Routing::new(cfg, claude)?)
}

/// `8G`, `512M`, `1024K` or plain bytes.
fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim().to_ascii_uppercase();
    let t = t.strip_suffix('B').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let value: f64 = num.trim().parse().with_context(|| {
        format!("--max-memory must look like 8G, 512M or a byte count, got '{text}'")
    })?;
    Ok((value * mult as f64) as u64)
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
