-- Which builds may run against this schema. Builds ignore applied migrations they do not know
-- (newer releases' migrations), which is safe only while those are additive: new tables, new
-- nullable or defaulted columns, new indexes, wider CHECK constraints. A migration that older
-- builds cannot run against (a dropped or renamed column, a narrower constraint, changed
-- meaning) ends with
--   UPDATE tasker_schema_compat SET min_migration = <its own version>;
-- and every build older than it refuses to start with a message naming both versions.
CREATE TABLE IF NOT EXISTS tasker_schema_compat (
    id             boolean PRIMARY KEY DEFAULT true CHECK (id),
    min_migration  bigint NOT NULL
);
INSERT INTO tasker_schema_compat (min_migration) VALUES (20261123000001) ON CONFLICT DO NOTHING;
