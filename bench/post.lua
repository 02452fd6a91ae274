-- wrk script: POST the benchmark's ~300-byte form body (bench/run sets BODY in the
-- environment) to the URL given on the command line.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.body = os.getenv("BODY")
