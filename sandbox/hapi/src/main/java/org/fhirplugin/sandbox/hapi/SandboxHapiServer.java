package org.fhirplugin.sandbox.hapi;

import ca.uhn.fhir.jpa.search.builder.SearchBuilder;
import ca.uhn.fhir.rest.server.RestfulServer;
import java.lang.management.ManagementFactory;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;

/**
 * Entry point: {@code java -jar sandbox-hapi.jar [--port 8080] [--host 127.0.0.1]}.
 *
 * <p>Builds the Spring context of {@link SandboxJpaConfig}, then serves its {@link RestfulServer}
 * with embedded Jetty at {@code http://HOST:PORT/fhir}. On SIGTERM Jetty stops first (in-flight
 * requests finish), then the Spring context closes.
 */
public final class SandboxHapiServer {

	private static final Logger LOG = LoggerFactory.getLogger(SandboxHapiServer.class);

	private SandboxHapiServer() {}

	public static void main(String[] args) throws Exception {
		int port = 8080;
		String host = "127.0.0.1";
		for (int i = 0; i < args.length; i++) {
			String arg = args[i];
			if (("--port".equals(arg) || "--host".equals(arg)) && i + 1 < args.length) {
				String value = args[++i];
				if ("--port".equals(arg)) {
					port = Integer.parseInt(value);
				} else {
					host = value;
				}
			} else {
				System.err.println("usage: java -jar sandbox-hapi.jar [--port N] [--host ADDRESS]");
				System.exit(2);
			}
		}

		// HAPI asks for ids in lists of up to 800 per query (IN (...)); profiled with jstack, a Group
		// $export spent most of its time in H2 evaluating those lists row by row, in the include
		// step that finds each patient's resources. Lists of 100 halve a 1,000-patient export
		// (20 s -> 11 s; 25 was no faster). Only the size of each query changes, not what it finds.
		SearchBuilder.setMaxPageSizeForTest(100);
		AnnotationConfigApplicationContext spring = new AnnotationConfigApplicationContext(SandboxJpaConfig.class);
		RestfulServer fhirServlet = spring.getBean(RestfulServer.class);

		Server jetty = new Server();
		jetty.setStopTimeout(10_000);
		ServerConnector connector = new ServerConnector(jetty);
		connector.setHost(host);
		connector.setPort(port);
		jetty.addConnector(connector);

		ServletContextHandler context = new ServletContextHandler();
		context.setContextPath("/");
		ServletHolder holder = new ServletHolder("fhir", fhirServlet);
		holder.setInitOrder(1);
		context.addServlet(holder, "/fhir/*");
		jetty.setHandler(context);

		Runtime.getRuntime().addShutdownHook(new Thread(() -> {
			LOG.info("Stopping the sandbox HAPI FHIR server");
			try {
				jetty.stop();
			} catch (Exception e) {
				LOG.warn("Jetty did not stop cleanly", e);
			}
			spring.close();
		}, "sandbox-hapi-shutdown"));

		try {
			jetty.start();
		} catch (Exception e) {
			LOG.error("Could not serve on {}:{}: {}", host, port, e.toString());
			System.exit(1);
		}
		long uptime = ManagementFactory.getRuntimeMXBean().getUptime();
		LOG.info("Sandbox HAPI FHIR R4 server ready at http://{}:{}/fhir ({} ms after JVM start)", host, port, uptime);
		jetty.join();
	}
}
