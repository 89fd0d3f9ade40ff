package org.fhirplugin.sandbox.hapi;

import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.provider.ValueSetOperationProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.narrative2.NullNarrativeGenerator;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.LoggingInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import org.hl7.fhir.r4.model.Bundle;
import org.hl7.fhir.r4.model.Meta;
import org.springframework.beans.factory.annotation.Qualifier;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;

/**
 * The HTTP side: one HAPI {@link RestfulServer} (mounted on /fhir/* by {@link SandboxHapiServer})
 * carrying the JPA resource providers (CRUD, search, $validate per type), the JPA system provider
 * (transaction and batch Bundles at the base), database-backed paging and the JPA
 * CapabilityStatement, and the FHIR Bulk Data {@code $export} operations (system, Patient and
 * Group level, with their status and delete endpoints), which HAPI runs as Batch2 jobs.
 */
@Configuration
public class SandboxRestConfig {

	/** {@code $export} (Bulk Data Access IG): HAPI wires its collaborators into the provider's fields. */
	@Bean
	public BulkDataExportProvider bulkDataExportProvider() {
		return new BulkDataExportProvider();
	}

	@Bean
	public RestfulServer restfulServer(
			@Qualifier("mySystemDaoR4") IFhirSystemDao<Bundle, Meta> systemDao,
			@Qualifier("mySystemProviderR4") JpaSystemProvider<Bundle, Meta> systemProvider,
			ResourceProviderFactory resourceProviderFactory,
			ValueSetOperationProvider valueSetOperationProvider,
			DatabaseBackedPagingProvider pagingProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			BulkDataExportProvider bulkDataExportProvider) {
		RestfulServer server = new RestfulServer(systemDao.getContext());
		// Stored resources keep whatever narrative the client sent; none is generated.
		server.getFhirContext().setNarrativeGenerator(new NullNarrativeGenerator());

		server.registerProviders(resourceProviderFactory.createProviders());
		server.registerProvider(systemProvider);
		server.registerProvider(valueSetOperationProvider);
		server.registerProvider(bulkDataExportProvider);
		server.setPagingProvider(pagingProvider);

		JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport);
		capabilities.setImplementationDescription("fhir-plugin sandbox HAPI FHIR R4 server");
		server.setServerConformanceProvider(capabilities);

		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		server.setDefaultPrettyPrint(true);

		LoggingInterceptor requestLog = new LoggingInterceptor();
		requestLog.setLoggerName("sandbox.requests");
		requestLog.setMessageFormat("${requestVerb} ${requestUrl} (${operationType}) ${processingTimeMillis} ms");
		requestLog.setLogExceptions(true);
		server.registerInterceptor(requestLog);
		return server;
	}
}
