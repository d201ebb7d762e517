-- One database per service (docker compose): each service owns and migrates its own schema.
CREATE DATABASE tasks;
CREATE DATABASE conversations;
