//! Applies a reload's [`Plan`] to the running pipeline: drivers stopped and started, the
//! writer and (when needed) the publisher told, the commands task rewired. What a reload
//! changes is decided in [`super::reload`]; this is the doing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use protocols::model::DeviceId;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::reload::Plan;
use super::writer::WriterUpdate;
use super::{
    add_to_catalog, api_view, encoder_for, meta_for, node_for, read_password, settings_of,
    spawn_driver, DriverTask, ReloadError, Running,
};
use crate::config::{Config, DeviceSettings};
use crate::metrics::Metrics;
use crate::publish::Publisher;

impl Running {
    /// Applies a checked config to the running gateway without a restart and returns what it
    /// did. Only devices whose settings or tags changed are stopped and started again, added
    /// or removed; every other device keeps its connection and its schedule. An `[mqtt]`
    /// change replaces the publisher: the old one drains its window for `shutdown_grace` and
    /// disconnects, the new one connects and replays what is on disk. The buffer, the ledger,
    /// the seq and the boot are never reset, so no record is lost or renumbered.
    /// `[gateway] id`, `data_dir` and `[buffer]` changes are logged and kept for the next
    /// start ([`Plan::not_live`]). Refused (and counted) only when the new MQTT password
    /// cannot be read; then nothing changes.
    pub async fn reload(&mut self, new: Config) -> Result<Plan, ReloadError> {
        let plan = Plan::new(&self.config, &new);
        let config = Plan::effective(&self.config, new);
        if plan.mqtt_changed {
            if let Err(e) = read_password(&config) {
                Metrics::add(&self.metrics.reloads_refused, 1);
                error!(error = %e, "the new configuration is refused; keeping the running one");
                return Err(e.into());
            }
        }
        for part in &plan.not_live {
            warn!(setting = %part, "changed in the file but not applied until the gateway restarts");
        }
        if self.config.commands != config.commands {
            match (config.commands.enabled, &self.commands) {
                (true, Some(_)) => {
                    self.shared.commands_enabled.store(true, Ordering::Relaxed);
                    info!(write_interval_ms = config.commands.write_interval.as_millis() as u64, "commands on, with the reloaded [commands] settings");
                }
                (true, None) => warn!("[commands] turned on: commands are taken once the gateway restarts (no commands task runs in this start)"),
                (false, _) => {
                    self.shared.commands_enabled.store(false, Ordering::Relaxed);
                    info!("commands turned off by the reload: every command is refused from now on");
                }
            }
        }

        // Stop the drivers of changed and removed devices before starting anything, so a
        // device (or a serial line) never has two drivers at once.
        let stopping: std::collections::HashSet<&str> = plan
            .changed
            .iter()
            .chain(&plan.removed)
            .map(|n| &**n)
            .collect();
        let (stop, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.drivers)
            .into_iter()
            .partition(|d| stopping.contains(&*d.name));
        for d in &stop {
            d.cancel.cancel();
        }
        for d in stop {
            if let Some(commands) = &mut self.commands {
                commands.forget(&d.ids);
            }
            let _ = d.task.await;
        }

        // New catalog entries for changed and added devices: an id is never reused, so a
        // batch still in flight from a stopped driver keeps its own names.
        let mut catalog = (*self.catalog).clone();
        let starting: std::collections::HashSet<&str> = plan
            .changed
            .iter()
            .chain(&plan.added)
            .map(|n| &**n)
            .collect();
        let fresh: Vec<(DeviceSettings, Vec<DeviceId>)> = config
            .devices
            .iter()
            .filter(|d| starting.contains(&*d.name))
            .map(|d| (d.clone(), add_to_catalog(&mut catalog, d)))
            .collect();
        let catalog = Arc::new(catalog);

        // The writer learns the new ids (and topics) before any new driver can send a batch.
        // A Sparkplug node declares its devices in its births: new devices mean a new session.
        let new_devices = !plan.changed.is_empty() || !plan.added.is_empty();
        let restart_publisher =
            plan.mqtt_changed || (config.mqtt.sparkplug.is_some() && new_devices);
        let node = if restart_publisher {
            // A kept driver's device is unchanged: the new config's entry is its settings.
            let lines = keep
                .iter()
                .filter_map(|d| settings_of(&config, d).map(|s| (s, &d.ids[..])))
                .chain(fresh.iter().map(|(s, ids)| (s, &ids[..])));
            node_for(
                &config,
                &catalog,
                lines,
                self.shared.latest.clone(),
                self.boot,
            )
        } else {
            None
        };
        let (live, live_rx) = if restart_publisher {
            let (tx, rx) = mpsc::channel(usize::from(config.mqtt.max_inflight) * 2);
            self.live = tx.downgrade();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let update = WriterUpdate {
            encoder: encoder_for(&config, self.boot, &catalog),
            max_packet: config.mqtt.max_packet_size,
            live,
        };
        if self.updates.send(update).await.is_err() {
            warn!("the writer has ended; the reload applies to nothing");
        }
        if let Some(live_rx) = live_rx {
            // The writer dropped the old publisher's channel: it drains and disconnects; the
            // new one connects after it, so the broker never sees two sessions at once.
            let old = self.publisher.take();
            let (mqtt, buffer, boot, shared) = (
                config.mqtt.clone(),
                config.buffer.clone(),
                self.boot,
                self.shared.clone(),
            );
            let gateway = config.gateway.id.clone();
            self.publisher = Some(tokio::spawn(async move {
                if let Some(old) = old {
                    let _ = old.await;
                }
                info!(host = %mqtt.host, port = mqtt.port, "connecting with the reloaded MQTT settings");
                Publisher::run(
                    mqtt,
                    buffer.commit_interval,
                    buffer.replay_rate,
                    (gateway, boot),
                    shared,
                    live_rx,
                    node,
                )
                .await;
            }));
        }

        let mut started: std::collections::HashMap<Arc<str>, DriverTask> = fresh
            .into_iter()
            .map(|(settings, ids)| {
                let name = settings.name.clone();
                let inbox = self
                    .commands
                    .as_mut()
                    .and_then(|c| c.inbox(&settings, &ids));
                let task = spawn_driver(
                    settings,
                    ids,
                    &catalog,
                    &self.batch_tx,
                    &self.drivers_cancel,
                    inbox,
                );
                (name, task)
            })
            .collect();
        let mut kept: std::collections::HashMap<Arc<str>, DriverTask> =
            keep.into_iter().map(|d| (d.name.clone(), d)).collect();
        self.drivers = config
            .devices
            .iter()
            .filter_map(|d| started.remove(&d.name).or_else(|| kept.remove(&d.name)))
            .collect();
        self.devices = self
            .drivers
            .iter()
            .flat_map(|d| d.handles.iter().cloned())
            .collect();
        self.catalog = catalog;
        self.config = config;
        if let Some(commands) = &self.commands {
            // The new drivers' channels and the new config's checks (new ids for changed
            // devices, new tags, `writable`, bounds and `write_interval`), before any command.
            let ids: Vec<(String, Vec<DeviceId>)> = self
                .drivers
                .iter()
                .map(|d| (d.name.to_string(), d.ids.clone()))
                .collect();
            commands.rewire(&self.config, &ids);
        }
        self.shared
            .meta
            .send_replace(meta_for(&self.config, &self.catalog, &self.drivers));
        if let Some((_, state, _)) = &self.api {
            let (handles, infos, ids) = api_view(&self.config, &self.drivers);
            state.set_devices(handles, infos, ids, self.catalog.clone());
        }
        Metrics::add(&self.metrics.reloads, 1);
        info!(
            unchanged = plan.unchanged.len(),
            changed = ?plan.changed,
            added = ?plan.added,
            removed = ?plan.removed,
            mqtt_changed = plan.mqtt_changed,
            "configuration reloaded"
        );
        Ok(plan)
    }
}
