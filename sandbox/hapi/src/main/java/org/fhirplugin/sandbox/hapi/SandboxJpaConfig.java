package org.fhirplugin.sandbox.hapi;

import ca.uhn.fhir.batch2.api.IJobMaintenanceService;
import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.MemoryBinaryStorageSvcImpl;
import ca.uhn.fhir.jpa.api.svc.IIdHelperService;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dao.JpaPid;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import jakarta.persistence.EntityManagerFactory;
import java.util.Properties;
import javax.sql.DataSource;
import org.apache.commons.dbcp2.BasicDataSource;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Lazy;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

/**
 * Storage side of the sandbox: HAPI's JPA server for R4 ({@link JpaR4Config} + {@link HapiJpaConfig})
 * on a fresh in-memory H2 database, with Hibernate Search, subscriptions, MDM and CQL left out.
 *
 * <p>HAPI's configs need a few beans that an application must supply: the data source, the entity
 * manager factory, the transaction manager, the storage/partition settings, binary storage and an
 * in-process message broker for its batch framework (HAPI's in-memory channels).
 */
@Configuration
@Import({
	JpaR4Config.class,
	HapiJpaConfig.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	SubscriptionChannelConfig.class,
	ThreadPoolFactoryConfig.class,
	SandboxRestConfig.class
})
public class SandboxJpaConfig {

	/** One database per JVM: every start of the sandbox begins empty. */
	static final String JDBC_URL = "jdbc:h2:mem:sandbox-hapi;DB_CLOSE_DELAY=-1";

	@Bean(destroyMethod = "close")
	public BasicDataSource dataSource() {
		BasicDataSource ds = new BasicDataSource();
		ds.setDriver(new org.h2.Driver());
		ds.setUrl(JDBC_URL);
		ds.setUsername("sa");
		ds.setPassword("");
		ds.setMaxTotal(30);
		return ds;
	}

	@Bean
	@Primary
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource) {
		LocalContainerEntityManagerFactoryBean emf =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		emf.setPersistenceUnitName("SANDBOX_HAPI_PU");
		emf.setDataSource(dataSource);
		emf.setJpaProperties(hibernateProperties());
		return emf;
	}

	private static Properties hibernateProperties() {
		Properties p = new Properties();
		p.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
		// The database is new on every start, so the schema is generated from the entities.
		p.put("hibernate.hbm2ddl.auto", "update");
		p.put("hibernate.search.enabled", "false");
		// Spring hands Hibernate the entity classes HAPI lists; scanning the jars again is wasted time.
		p.put("hibernate.archive.autodetection", "none");
		p.put("hibernate.show_sql", "false");
		p.put("hibernate.format_sql", "false");
		p.put("hibernate.jdbc.batch_size", "20");
		p.put("hibernate.cache.use_query_cache", "false");
		p.put("hibernate.cache.use_second_level_cache", "false");
		p.put("hibernate.cache.use_minimal_puts", "false");
		return p;
	}

	@Bean
	@Primary
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		JpaTransactionManager tm = new JpaTransactionManager();
		tm.setEntityManagerFactory(entityManagerFactory);
		return tm;
	}

	@Bean
	public JpaStorageSettings storageSettings() {
		JpaStorageSettings s = new JpaStorageSettings();
		// Client-assigned ids: alphanumeric (HAPI's default), server ids sequential.
		s.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.ALPHANUMERIC);
		s.setAllowMultipleDelete(true);
		s.setExpungeEnabled(true);
		s.setDeleteExpungeEnabled(true);
		// Nothing the tests need that costs start-up time or background work.
		s.setAdvancedHSearchIndexing(false);
		s.setHibernateSearchIndexSearchParams(false);
		s.setHibernateSearchIndexFullText(false);
		s.setStoreResourceInHSearchIndex(false);
		s.setMarkResourcesForReindexingUponSearchParameterChange(false);
		s.setEnableTaskResourceReindexing(false);
		s.setEnableTaskPreExpandValueSets(false);
		s.setPreExpandValueSets(false);
		// Bulk Data $export runs as a Batch2 job; its NDJSON files are Binary resources whose
		// content lives in the in-memory binary storage below. Files expire after an hour.
		s.setEnableTaskBulkExportJobExecution(true);
		s.setEnableTaskBulkImportJobExecution(false);
		return s;
	}

	/** H2 scans the resource table for HAPI's multi-id lookup; see {@link OneByOneIdHelperService}. */
	@Bean
	@Primary
	public IIdHelperService<JpaPid> oneByOneIdHelperService() {
		return new OneByOneIdHelperService();
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	/** No subscription channel types are enabled: the subscription machinery is not loaded. */
	@Bean
	public SubscriptionSettings subscriptionSettings() {
		return new SubscriptionSettings();
	}

	/** Bulk export jobs advance once per maintenance pass: pass twice a second (see the class). */
	@Bean(destroyMethod = "close")
	public FastBatchMaintenance fastBatchMaintenance(IJobMaintenanceService maintenance) {
		return new FastBatchMaintenance(maintenance, 500);
	}

	@Bean
	@Lazy
	public IBinaryStorageSvc binaryStorageSvc() {
		return new MemoryBinaryStorageSvcImpl();
	}
}
