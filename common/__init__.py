"""The shared runtime every service uses: settings, logging, auth, server bootstrap, database."""
