package org.fhirplugin.sandbox.hapi;

import ca.uhn.fhir.batch2.api.IJobMaintenanceService;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Runs HAPI's Batch2 maintenance pass every half second instead of once a minute, so a Bulk Data
 * {@code $export} of a test population finishes in seconds: each pass moves a job on by one step
 * (fetch ids, write the NDJSON Binaries, build the report). A test server's only batch work is
 * exports, so the extra passes cost next to nothing.
 */
public class FastBatchMaintenance implements AutoCloseable {

	private static final Logger ourLog = LoggerFactory.getLogger(FastBatchMaintenance.class);
	private final ScheduledExecutorService myExecutor;

	public FastBatchMaintenance(IJobMaintenanceService maintenance, long periodMillis) {
		myExecutor = Executors.newSingleThreadScheduledExecutor(r -> {
			Thread t = new Thread(r, "sandbox-batch2-maintenance");
			t.setDaemon(true);
			return t;
		});
		myExecutor.scheduleWithFixedDelay(() -> {
			try {
				maintenance.runMaintenancePass();
			} catch (RuntimeException e) {
				ourLog.warn("Batch2 maintenance pass failed: {}", e.toString());
			}
		}, periodMillis, periodMillis, TimeUnit.MILLISECONDS);
	}

	@Override
	public void close() {
		myExecutor.shutdownNow();
	}
}
