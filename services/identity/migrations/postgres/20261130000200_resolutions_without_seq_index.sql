-- No statement looks resolutions up by `seq`: replays read a component's resolutions by
-- profile (`resolutions_by_profile`) and order them by `seq` after. The column's identity
-- sequence already makes it unique, so its index only cost one more btree insert per resolved
-- event, on the pipeline's hottest table.
DROP INDEX IF EXISTS resolutions_by_seq;
