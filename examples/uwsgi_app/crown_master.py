"""The crown in the uWSGI master (see uwsgi-master.ini): imported by the master before it forks.

``shared-import`` makes the master import this module also with ``lazy-apps`` (where the WSGI
module is imported in each worker only). The job is a process forked from the leading master;
every worker of the leading master answers ``crown_sync.is_leader(NAME)`` True.
"""

import crown_sync.uwsgi

NAME = "uwsgi-demo"

crown_sync.uwsgi.crown_in_master(NAME, child="examples.uwsgi_app.jobs:run_job_process")
