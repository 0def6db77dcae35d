//! The schema (migrations) and the templates stored in the database.

use super::{db, PostgresBackend};
use crate::error::{EngineError, EngineResult};
use crate::template::{TaskTemplate, TemplateKey};
use serde_json::Value;
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::sync::Arc;
use tracing::info;
use uuid::Uuid;

/// A build may run against a schema that has migrations it does not know, as long as they are
/// additive. A migration that older builds cannot run against raises
/// `tasker_schema_compat.min_migration` to its own version; a build whose newest migration is
/// older refuses to start.
pub(super) fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

impl PostgresBackend {
    pub(super) async fn template(&mut self, key: &TemplateKey) -> EngineResult<Arc<TaskTemplate>> {
        if let Some(t) = self.templates.get(key) {
            return Ok(Arc::clone(t));
        }
        let row = sqlx::query("SELECT yaml, source FROM tasker_templates WHERE namespace = $1 AND name = $2 AND version = $3")
            .bind(&key.namespace)
            .bind(&key.name)
            .bind(&key.version)
            .fetch_optional(self.pool()?)
            .await
            .map_err(db)?;
        let Some(row) = row else {
            return Err(EngineError::config(format!(
                "unknown template {key} (not loaded here and not stored in the database; loaded here: {})",
                self.local.describe_known()
            )));
        };
        let yaml: String = row.get("yaml");
        let source: String = row.get("source");
        let template = Arc::new(TaskTemplate::from_yaml(
            &yaml,
            std::path::Path::new(&format!("{source} (from database)")),
        )?);
        self.templates.insert(key.clone(), Arc::clone(&template));
        Ok(template)
    }

    /// Store this process's templates for the others. A template stored under the same
    /// namespace, name and version with different content is never replaced: tasks created of
    /// it would run with another DAG. This process refuses to start instead.
    pub(super) async fn store_templates(&self) -> EngineResult<()> {
        let pool = self.pool()?;
        for template in self.local.iter() {
            sqlx::query(
                "INSERT INTO tasker_templates (namespace, name, version, yaml, source) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (namespace, name, version) DO NOTHING",
            )
            .bind(&template.namespace)
            .bind(&template.name)
            .bind(&template.version)
            .bind(&template.yaml)
            .bind(template.source.display().to_string())
            .execute(pool)
            .await
            .map_err(db)?;
            let stored = sqlx::query(
                "SELECT yaml, source, to_char(updated_at, 'YYYY-MM-DD HH24:MI:SS TZ') AS stored_at
                 FROM tasker_templates WHERE namespace = $1 AND name = $2 AND version = $3",
            )
            .bind(&template.namespace)
            .bind(&template.name)
            .bind(&template.version)
            .fetch_one(pool)
            .await
            .map_err(db)?;
            let stored_yaml: String = stored.get("yaml");
            if stored_yaml != template.yaml
                && template_content(&stored_yaml) != template_content(&template.yaml)
            {
                let source: String = stored.get("source");
                let stored_at: String = stored.get("stored_at");
                return Err(EngineError::config(format!(
                    "template {} ({}) differs from the template stored in the database under the same namespace, \
                     name and version (stored from {source} at {stored_at}): tasks of one version must all run \
                     the same steps. Give the changed template a new `version`",
                    template.key(),
                    template.source.display(),
                )));
            }
        }
        Ok(())
    }

    /// The retry base and template of steps this process does not hold the record of.
    pub(super) async fn templates_of_steps(
        &mut self,
        steps: &[Uuid],
    ) -> EngineResult<HashMap<Uuid, (u32, Arc<TaskTemplate>)>> {
        let rows = sqlx::query(
            "SELECT s.step_uuid, s.attempt_base, t.namespace, t.name, t.version
             FROM tasker_steps s JOIN tasker_tasks t ON t.task_uuid = s.task_uuid WHERE s.step_uuid = ANY($1)",
        )
        .bind(steps)
        .fetch_all(self.pool()?)
        .await
        .map_err(db)?;
        let mut found = HashMap::new();
        for row in rows {
            let key = TemplateKey {
                namespace: row.get("namespace"),
                name: row.get("name"),
                version: row.get("version"),
            };
            let base = row.get::<i32, _>("attempt_base") as u32;
            found.insert(row.get("step_uuid"), (base, self.template(&key).await?));
        }
        Ok(found)
    }
}

/// The template's content, whatever its formatting and comments: its YAML as JSON with sorted keys.
pub(super) fn template_content(yaml: &str) -> Option<String> {
    let value: Value = serde_norway::from_str(yaml).ok()?;
    Some(sorted(value).to_string())
}

pub(super) fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Bring the schema up to this build's migrations. Migrations applied by a newer build are
/// left alone (they are additive) unless that build declared the schema closed to older ones.
pub(super) async fn migrate(pool: &PgPool, masked: &str) -> EngineResult<()> {
    let migrator = migrator();
    // sqlx serialises concurrent migrators with an advisory lock: simultaneous bootstraps are safe.
    migrator.run(pool).await.map_err(|e| {
        EngineError::start_failed(format!("migrating the schema at {masked} failed"), e)
    })?;
    let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    let required: i64 =
        sqlx::query_scalar("SELECT min_migration FROM tasker_schema_compat WHERE id")
            .fetch_one(pool)
            .await
            .map_err(|e| {
                EngineError::start_failed(
                    format!("reading the schema's compatibility at {masked} failed"),
                    e,
                )
            })?;
    if known < required {
        return Err(EngineError::Bootstrap(format!(
            "the database schema at {masked} needs a build that knows migration {required} or later (this build \
             knows up to {known}): a newer release changed the schema in a way older builds cannot use; run \
             this worker's newer release"
        )));
    }
    let newer: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE version > $1 AND success")
            .bind(known)
            .fetch_one(pool)
            .await
            .unwrap_or(0);
    if newer > 0 {
        info!(
            newer_migrations = newer,
            "the schema has additive migrations newer than this build; running against it"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_content_ignores_formatting_and_comments() {
        let a = "# a comment\nname: x\nversion: '1'\nsteps: [{name: a}]\n";
        let b = "version: \"1\"\nsteps:\n  - name: a\nname: x\n";
        let c = "name: x\nversion: '1'\nsteps: [{name: b}]\n";
        assert_eq!(template_content(a), template_content(b));
        assert_ne!(template_content(a), template_content(c));
    }
}
