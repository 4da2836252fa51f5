-- The job database as cadnode made it before migrations (create_all, schema version 3), for sqlite.
-- Frozen: tests/unit/test_schema.py upgrades a database made from it.
CREATE TABLE cadnode_meta (
	"key" VARCHAR(32) NOT NULL, 
	value TEXT NOT NULL, 
	PRIMARY KEY ("key")
);
CREATE TABLE events (
	id INTEGER NOT NULL, 
	at FLOAT NOT NULL, 
	level VARCHAR(8) NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	study_uid VARCHAR(64), 
	message TEXT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_events_at ON events (at);
CREATE INDEX ix_events_study_uid ON events (study_uid);
CREATE TABLE studies (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	patient_id VARCHAR(64) NOT NULL, 
	accession VARCHAR(16) NOT NULL, 
	study_date VARCHAR(8) NOT NULL, 
	calling_ae VARCHAR(16) NOT NULL, 
	first_received FLOAT NOT NULL, 
	last_received FLOAT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (study_uid)
);
CREATE INDEX ix_studies_last_received ON studies (last_received);
CREATE INDEX ix_studies_state ON studies (state);
CREATE TABLE instances (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	series_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	transfer_syntax VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	size INTEGER NOT NULL, 
	laterality VARCHAR(1), 
	"view" VARCHAR(16), 
	for_presentation BOOLEAN NOT NULL, 
	modifiers VARCHAR(255) NOT NULL, 
	acquired VARCHAR(26) NOT NULL, 
	received_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id), 
	UNIQUE (sop_instance_uid)
);
CREATE INDEX ix_instances_study_id ON instances (study_id);
CREATE TABLE jobs (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	reason VARCHAR(32) NOT NULL, 
	attempts INTEGER NOT NULL, 
	lease_owner VARCHAR(64), 
	lease_until FLOAT, 
	created_at FLOAT NOT NULL, 
	started_at FLOAT, 
	finished_at FLOAT, 
	scores_json TEXT, 
	views VARCHAR(64) NOT NULL, 
	model_version VARCHAR(64) NOT NULL, 
	error TEXT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
CREATE INDEX ix_jobs_state ON jobs (state);
CREATE INDEX ix_jobs_study_id ON jobs (study_id);
CREATE TABLE deliveries (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	destination VARCHAR(128) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	path TEXT NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt FLOAT NOT NULL, 
	last_error TEXT, 
	sent_at FLOAT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE INDEX ix_deliveries_job_id ON deliveries (job_id);
CREATE INDEX ix_deliveries_next_attempt ON deliveries (next_attempt);
CREATE INDEX ix_deliveries_state ON deliveries (state);
INSERT INTO cadnode_meta (key, value) VALUES ('schema_version', '3');
