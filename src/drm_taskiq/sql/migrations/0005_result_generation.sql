-- The generation (counting manual retries) of the run whose result a taskiq_results row holds:
-- the run ledger does not let an older run's result, written late (an entry claimed from a
-- writer that died), replace a newer run's; `jobs` keeps the higher generation the same way.
-- NULL in rows written by taskiq-postgres itself (its inserts name three values: the column
-- takes its default).
ALTER TABLE taskiq_results ADD COLUMN IF NOT EXISTS generation INT;
